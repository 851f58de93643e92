"""End to end on torch exports: a Conv-BN-ReLU network exported by torch in each form goes
through the `onnxrep fuse` console script and comes out plain, verified, dynamic batch intact.

The network is `models.registry.FAMILIES["convbn"]` (stride 2, groups, bias + BN,
ConvTranspose + BN, Linear + BN1d) exported with `models.export.export`; without `models/`
a small Conv-BN-ReLU network built here is exported with torch directly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from tests.helpers import cli, dims, op_counts

pytestmark = pytest.mark.torch

FORMS = ("ts-folded", "ts-unfolded", "dynamo", "dynamo-noopt")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "BatchNormalization")


def _fallback_network() -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...]]:
    """(train, plain, input shape): Conv-BN-ReLU x2 and a pooled Linear head."""
    def net(bn: bool) -> torch.nn.Module:
        def cbr(cin: int, cout: int, **kw: int) -> list[torch.nn.Module]:
            layers = [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=not bn, **kw)]
            return layers + ([torch.nn.BatchNorm2d(cout)] if bn else []) + [torch.nn.ReLU()]
        return torch.nn.Sequential(*cbr(3, 8), *cbr(8, 16, stride=2, groups=2),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(16, 10))
    torch.manual_seed(0)
    train = net(True).eval()
    with torch.no_grad():
        for m in train.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return train, net(False).eval(), (1, 3, 32, 32)


def _fallback_export(model: torch.nn.Module, shape: tuple[int, ...], path: Path,
                     form: str) -> Path:
    x = torch.randn(*shape)
    common = dict(opset_version=18, input_names=["input"], output_names=["output"])
    if form.startswith("ts-"):
        torch.onnx.export(model, (x,), str(path), dynamo=False,
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                          do_constant_folding=form == "ts-folded", **common)
    else:
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=form == "dynamo",
                                    dynamic_shapes=({0: torch.export.Dim("N")},), **common)
        program.save(str(path), external_data=True)
    return path


def _network() -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...], object]:
    try:
        from models.export import export
        from models.registry import FAMILIES
    except ImportError:
        return (*_fallback_network(), _fallback_export)
    family = FAMILIES["convbn"]
    return family.build_train(), family.build_plain(), family.input_shape, export


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, tuple]]:
    """form -> (training-time export, plain export, input shape); exported once."""
    train, plain, shape, export = _network()
    folder = tmp_path_factory.mktemp("convbn")
    made = {}
    for form in FORMS:
        (folder / form).mkdir()
        src = export(train, shape, folder / form / "train.onnx", form)
        ref = export(plain, shape, folder / form / "plain.onnx", form)
        made[form] = (Path(src), Path(ref), tuple(shape))
    return made


def _header(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("form", FORMS)
def test_convbn_export_fuses_to_plain(form: str, exports: dict, tmp_path: Path) -> None:
    src, plain_path, shape = exports[form]
    out, report_path = tmp_path / "fused.onnx", tmp_path / "report.json"
    source = _header(src)
    batch_dynamic = isinstance(dims(source.graph.input[0])[0], str)
    args = ["fuse", src, out, "--report", report_path, "-q"]
    if batch_dynamic:  # verify at batch 2: a BN folded per sample would show
        args += ["--input-shape", f"{source.graph.input[0].name}:2,{','.join(map(str, shape[1:]))}"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is True
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    fused = onnx.load(str(out))
    onnx.checker.check_model(str(out))
    counts = op_counts(fused)
    plain_counts = op_counts(_header(plain_path))
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == plain_counts["Conv"] >= 2
    assert Counter({op: counts[op] for op in COMPUTE_OPS}) == Counter(
        {op: plain_counts[op] for op in COMPUTE_OPS})
    bns_before = report["ops_before"].get("BatchNormalization", 0)
    assert report["rules_applied"].get("fold-bn", 0) == bns_before

    assert [dims(i) for i in fused.graph.input] == [dims(i) for i in source.graph.input]
    assert [dims(o) for o in fused.graph.output] == [dims(o) for o in source.graph.output]
    if form.startswith("ts-"):
        assert batch_dynamic  # TorchScript exports always keep the dynamic batch
    has_data = Path(str(src) + ".data").exists()
    assert Path(str(out) + ".data").exists() == has_data
    if form.startswith("dynamo"):
        assert has_data
