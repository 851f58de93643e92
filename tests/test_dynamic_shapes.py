"""Symbolic dims with no --input-shape: verification picks sizes the input model runs at
(onnxrep.admissible; docs/DESIGN.md, "Verification"), and says so; when none is found, one
line that names --input-shape and the input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxrep.admissible import constraints, stride_alignment
from onnxrep.verify import verify
from tests.helpers import (
    assert_one_line_error,
    bn,
    chain,
    cli,
    const,
    conv,
    make_model,
    node,
    op_counts,
    rand,
)

XS = ["N", 3, "H", "W"]


def _stem(out_channels: int = 3, strides: int = 1) -> tuple[list, list]:
    """x -> Conv3x3 (stride `strides`) -> BN: one fold-bn for every model here."""
    return chain(conv("stem", "x", rand(out_channels, 3, 3, 3, seed=1), rand(out_channels),
                      pads=[1, 1, 1, 1], strides=[strides, strides]),
                 bn("bn", "stem_out", out_channels, out="t0"))


def stride32_model() -> onnx.ModelProto:
    """Five stride-2 convs, Resize x32, Add with the input: runs at multiples of 32 only."""
    nodes, inits = _stem(strides=2)
    for k in range(1, 5):
        n, i = conv(f"down{k}", f"t{k - 1}", rand(3, 3, 3, 3, seed=10 + k), rand(3),
                    out=f"t{k}", pads=[1, 1, 1, 1], strides=[2, 2])
        nodes.append(n)
        inits += i
    inits.append(const("scales", np.array([1, 1, 32, 32]), np.float32))
    nodes += [node("Resize", ["t4", "", "scales"], ["up"], "up", mode="nearest"),
              node("Add", ["up", "x"], ["y"], "skip")]
    return make_model(nodes, [("x", XS)], [("y", None)], inits)


def reshape_model() -> onnx.ModelProto:
    """A Reshape to the constant [1, 4, 100]: runs at batch 1 and H*W = 100 only."""
    nodes, inits = _stem(out_channels=4)
    inits.append(const("shape", np.array([1, 4, 100]), np.int64))
    nodes.append(node("Reshape", ["t0", "shape"], ["y"], "flat"))
    return make_model(nodes, [("x", XS)], [("y", None)], inits)


def gemm_model() -> onnx.ModelProto:
    """A stride-2 conv, Flatten, a Gemm with a 98x5 weight: 2 * 7 * 7 features, so H and W in
    {13, 14} (both parities), any batch."""
    nodes, inits = _stem(out_channels=2, strides=2)
    inits += [const("fc.W", rand(98, 5, seed=3)), const("fc.b", rand(5, seed=4))]
    nodes += [node("Flatten", ["t0"], ["flat"], "flatten", axis=1),
              node("Gemm", ["flat", "fc.W", "fc.b"], ["y"], "fc")]
    return make_model(nodes, [("x", XS)], [("y", None)], inits)


def unfindable_model() -> onnx.ModelProto:
    """An Add with a 37x41 constant, concatenated with the input: admits H=37, W=41 only
    (at 1 the Add broadcasts, the Concat does not), which a search over equal sizes never
    meets."""
    nodes, inits = _stem()
    inits.append(const("pos", rand(1, 3, 37, 41, seed=5)))
    nodes += [node("Add", ["t0", "pos"], ["t1"], "pos_add"),
              node("Concat", ["t1", "x"], ["y"], "cat", axis=1)]
    return make_model(nodes, [("x", XS)], [("y", None)], inits)


def _fuse_cli(tmp_path: Path, model: onnx.ModelProto, *flags: str):
    tmp_path.mkdir(exist_ok=True)
    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, src)
    proc = cli("fuse", src, dst, "--report", report, *flags)
    return proc, dst, report


# --- what the graph implies ---------------------------------------------------------------------


def test_stride_alignment_is_the_product_of_strides() -> None:
    assert stride_alignment(stride32_model()) == 32
    assert stride_alignment(reshape_model()) == 1


def test_constraints_read_reshape_gemm_and_constant_operands() -> None:
    assert [(c.tensor, c.target) for c in constraints(reshape_model())] == [("t0", 400)]
    assert [(c.tensor, c.target) for c in constraints(gemm_model())] == [("flat", 98)]
    assert [(c.tensor, c.target) for c in constraints(unfindable_model())] == [
        ("t0", 3), ("t0", 37), ("t0", 41)]


# --- through verify -------------------------------------------------------------------------------


def test_verify_finds_the_multiples_of_32() -> None:
    model = stride32_model()
    result = verify(model, model)
    assert result.passed
    assert result.automatic == {"N": 1, "H": 32, "W": 32}
    # and at 1, where the Add broadcasts: the input runs there, so the fused model must agree
    assert result.shapes_verified == [{"x": [1, 3, 32, 32]}, {"x": [2, 3, 32, 32]},
                                      {"x": [1, 3, 64, 64]}, {"x": [1, 3, 1, 1]}]
    assert "multiple of 32" in result.shape_search


def test_verify_finds_the_one_size_a_reshape_admits() -> None:
    model = reshape_model()
    result = verify(model, model)
    assert result.passed
    assert result.shapes_verified == [{"x": [1, 3, 10, 10]}]
    assert "Reshape 'flat'" in result.shape_search
    # no other batch, no other size: said, as for given sizes
    assert [s.split(":")[0] for s in result.skipped] == ["x[2, 3, 10, 10]", "x[1, 3, 11, 11]"]


def test_verify_finds_both_parities_a_gemm_admits() -> None:
    model = gemm_model()
    result = verify(model, model)
    assert result.passed
    assert result.shapes_verified == [{"x": [1, 3, 13, 13]}, {"x": [2, 3, 13, 13]},
                                      {"x": [1, 3, 14, 14]}]


def test_a_model_that_runs_at_any_size_is_verified_at_32_not_1() -> None:
    """1 is tried last: a run at 1 can be broadcasting (an upsampled map added to a 1x1 one),
    and a 3x3 conv at 1x1 shows only its centre tap; it is verified last, as the model runs
    there."""
    nodes, inits = _stem()
    model = make_model(nodes, [("x", XS)], [("t0", None)], inits)
    result = verify(model, model)
    assert result.shapes_verified == [{"x": [1, 3, 32, 32]}, {"x": [2, 3, 32, 32]},
                                      {"x": [1, 3, 33, 33]}, {"x": [1, 3, 1, 1]}]
    assert result.automatic == {"N": 1, "H": 32, "W": 32}


def test_a_model_that_runs_at_1_only_is_verified_there() -> None:
    nodes, inits = _stem()
    inits.append(const("one", rand(1, 3, 1, 1, seed=6)))
    nodes.append(node("Concat", ["t0", "one"], ["y"], "cat", axis=0))  # H = W = 1 only
    model = make_model(nodes, [("x", XS)], [("y", None)], inits)
    result = verify(model, model)
    assert result.passed
    assert result.automatic == {"N": 1, "H": 1, "W": 1}


def test_given_sizes_are_not_searched() -> None:
    model = stride32_model()
    result = verify(model, model, input_shapes={"x": [1, 3, 64, 64]})
    assert result.automatic == {} and result.shape_search == ""
    assert result.shapes_verified == [{"x": [1, 3, 64, 64]}, {"x": [2, 3, 64, 64]}]
    (skipped,) = result.skipped  # the other parity, as before
    assert skipped.startswith("x[1, 3, 65, 65]: the input model does not run there")


# --- through the CLI ------------------------------------------------------------------------------


def test_cli_fuses_a_stride_32_model_with_no_flags(tmp_path: Path) -> None:
    proc, dst, report_path = _fuse_cli(tmp_path, stride32_model())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert op_counts(onnx.load(dst)) == {"Conv": 5, "Resize": 1, "Add": 1}
    assert "symbolic dims H=32, N=1, W=32 chosen automatically (no --input-shape)" in proc.stdout
    assert "inputs x[1, 3, 64, 64]: normal" in proc.stdout
    verification = json.loads(report_path.read_text())["verification"]
    assert verification["automatic"] == {"H": 32, "N": 1, "W": 32}
    assert verification["shapes_verified"] == [{"x": [1, 3, 32, 32]}, {"x": [2, 3, 32, 32]},
                                               {"x": [1, 3, 64, 64]}, {"x": [1, 3, 1, 1]}]


def test_cli_with_input_shape_is_unchanged(tmp_path: Path) -> None:
    proc, _, report_path = _fuse_cli(tmp_path, stride32_model(), "--input-shape", "x:2,3,96,96")
    assert proc.returncode == 0, proc.stderr
    assert "chosen automatically" not in proc.stdout
    verification = json.loads(report_path.read_text())["verification"]
    assert verification["automatic"] == {}
    assert verification["shapes_verified"] == [{"x": [2, 3, 96, 96]}, {"x": [3, 3, 96, 96]}]
    proc, dst, _ = _fuse_cli(tmp_path / "again", stride32_model(), "--input-shape",
                             "x:1,3,40,40")
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "does not run at x[1, 3, 40, 40]" in line and "--input-shape" in line
    assert not dst.exists()


def test_cli_says_in_one_line_when_no_size_is_found(tmp_path: Path) -> None:
    proc, dst, report_path = _fuse_cli(tmp_path, unfindable_model())
    line = assert_one_line_error(proc.returncode, proc.stderr)  # no onnxruntime log line either
    assert "--input-shape x:" in line and "x[N, 3, H, W]" in line, line
    assert "tried" in line
    assert not dst.exists() and not report_path.exists()


# --- a torch detector with dynamic batch, height and width ----------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small FPN detector exported by the TorchScript exporter, BNs kept, with dynamic
    batch / height / width: stride 32, upsampled P5 added to P4 and P4 to P3."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional

    from models.export import quiet

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList([block(3, 8, 2), block(8, 8, 2), block(8, 8, 2),
                                         block(8, 8, 2), block(8, 8, 2)])
            self.lateral = nn.ModuleList([nn.Conv2d(8, 8, 1) for _ in range(3)])
            self.head = nn.Conv2d(8, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            levels = []
            for stage in self.stages:
                x = stage(x)
                levels.append(x)
            p5 = self.lateral[2](levels[4])
            p4 = self.lateral[1](levels[3]) + functional.interpolate(p5, scale_factor=2.0)
            p3 = self.lateral[0](levels[2]) + functional.interpolate(p4, scale_factor=2.0)
            return self.head(p3)

    torch.manual_seed(0)
    model = Detector().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False,
                          opset_version=18, input_names=["images"], output_names=["boxes"],
                          do_constant_folding=False,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "boxes": {0: "batch", 2: "h", 3: "w"}})
    return path


@pytest.mark.torch
def test_a_dynamic_detector_export_fuses_with_no_flags(detector: Path, tmp_path: Path) -> None:
    dst, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = cli("fuse", detector, dst, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(report_path.read_text())
    assert report["ops_before"]["BatchNormalization"] == 5
    assert op_counts(onnx.load(dst))["BatchNormalization"] == 0
    assert op_counts(onnx.load(dst))["Conv"] == 9
    verification = report["verification"]
    assert verification["automatic"] == {"batch": 1, "height": 32, "width": 32}
    assert verification["shapes_verified"] == [
        {"images": [1, 3, 32, 32]}, {"images": [2, 3, 32, 32]}, {"images": [1, 3, 64, 64]},
        {"images": [1, 3, 1, 1]}]  # at 1 the upsampled maps broadcast: the input runs there
    assert "batch=1, height=32, width=32 chosen automatically" in proc.stdout
