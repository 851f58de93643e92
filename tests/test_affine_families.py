"""propagate-affine end to end (issue 11): LeViT's Linear+BN1d on tokens, NextViT's pre-norm
BNs before q/k/v and the pooled MLP, and a BN before the pooled head, exported by torch in
every form, go through the CLI to zero BatchNormalization, verified at several batch sizes and
token counts, idempotent, with weights that do not grow."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import onnxrep
from models import registry
from models.export import export_forms
from tests.helpers import cli, export_families

pytestmark = pytest.mark.torch

FAMILIES = ["levit", "nextvit", "bnhead"]
CASES = [(name, form) for name in FAMILIES for form in registry.FAMILIES[name].forms]

# op counts of the fused exports: every BN gone; LeViT keeps one Mul (the attention scale on
# q @ k^T, between two data tensors), and the exporters' own reshapes stay
EXPECTED_OPS = {
    # reshape-chain then removes the Flatten / Reshape pairs the BNs sat between
    ("levit", "ts-folded"): {"Add": 6, "Concat": 3, "Conv": 4, "Gather": 2, "Gemm": 1,
                             "HardSwish": 5, "MatMul": 6, "Mul": 1, "ReduceMean": 1,
                             "Reshape": 3, "Shape": 3, "Slice": 1, "Softmax": 1, "Split": 1,
                             "Transpose": 5, "Unsqueeze": 4},
    ("levit", "dynamo"): {"Add": 6, "Conv": 4, "Gemm": 1, "HardSwish": 5, "MatMul": 6, "Mul": 1,
                          "ReduceMean": 1, "Reshape": 3, "Softmax": 1, "Split": 1,
                          "Transpose": 5},
    ("levit", "dynamo-noopt"): {"Add": 6, "Concat": 3, "Conv": 4, "Gemm": 1, "HardSwish": 5,
                                "MatMul": 6, "Mul": 1, "ReduceMean": 1, "Reshape": 6,
                                "Shape": 1, "Softmax": 1, "Split": 1, "Squeeze": 1,
                                "Transpose": 6},
    ("nextvit", "ts-folded"): {"Add": 12, "AveragePool": 1, "Concat": 12, "Conv": 6,
                               "Flatten": 1, "Gather": 4, "Gemm": 1, "GlobalAveragePool": 1,
                               "MatMul": 12, "Mul": 2, "Relu": 4, "Reshape": 12, "Shape": 4,
                               "Softmax": 2, "Transpose": 14, "Unsqueeze": 12},
    ("nextvit", "dynamo"): {"Add": 12, "AveragePool": 1, "Conv": 6, "Flatten": 1, "Gemm": 1,
                            "GlobalAveragePool": 1, "MatMul": 12, "Mul": 2, "Relu": 4,
                            "Reshape": 12, "Softmax": 2, "Transpose": 14},
    # the head's view stays a Reshape: the batch dim reaches it under a name shape inference
    # made up, which proves nothing (docs/RULES.md, flatten)
    ("nextvit", "dynamo-noopt"): {"Add": 12, "AveragePool": 1, "Concat": 13, "Conv": 6,
                                  "Gemm": 1, "GlobalAveragePool": 1, "MatMul": 12, "Mul": 2,
                                  "Relu": 4, "Reshape": 26, "Shape": 1, "Softmax": 2,
                                  "Squeeze": 1, "Transpose": 14},
    ("bnhead", "ts-folded"): {"Conv": 3, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1,
                              "Relu": 3},
    ("bnhead", "dynamo"): {"Conv": 3, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1,
                           "Relu": 3},
    ("bnhead", "dynamo-noopt"): {"Conv": 3, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1,
                                 "Relu": 3},
}
for _name in FAMILIES:  # without constant folding, the same plain graph as with it
    EXPECTED_OPS[(_name, "ts-unfolded")] = EXPECTED_OPS[(_name, "ts-folded")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return export_families(tmp_path_factory.mktemp("affine"), FAMILIES)


def _fuse(src: Path, out: Path, report: Path, batch: int, shape: tuple[int, ...]) -> dict:
    dims = ",".join(str(d) for d in (batch, *shape[1:]))
    proc = cli("fuse", src, out, "--report", report, "-q", "--input-shape", f"input:{dims}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_family_fuses_to_zero_batchnorm(name: str, form: str, exported: dict,
                                        tmp_path: Path) -> None:
    fam = registry.FAMILIES[name]
    out = tmp_path / "fused.onnx"
    report = _fuse(exported[name][form], out, tmp_path / "r.json", 2, fam.input_shape)
    assert report["verification"]["passed"]
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    assert report["rules_applied"].get("propagate-affine", 0) >= 1
    assert Counter(report["ops_after"]) == Counter(EXPECTED_OPS[(name, form)])
    sizes = report["weight_bytes"]
    assert sizes["after"] <= sizes["before"], sizes
    again = onnxrep.fuse(out, input_shapes={"input": [3, *fam.input_shape[1:]]})
    assert not again.report.applied, again.report.applied
    assert again.verified


@pytest.mark.parametrize(("name", "hw"), [("levit", (32, 32)), ("levit", (64, 48)),
                                          ("nextvit", (64, 48))])
def test_other_token_counts(name: str, hw: tuple[int, int], tmp_path: Path) -> None:
    """The same blocks exported at other sizes (other token counts), batch 3."""
    fam = registry.FAMILIES[name]
    shape = (1, 3, *hw)
    paths = export_forms(fam.build_train(), shape, {
        form: tmp_path / f"{name}-{form}.onnx" for form in ("ts-folded", "dynamo")})
    for form, src in paths.items():
        report = _fuse(src, tmp_path / f"{form}.fused.onnx", tmp_path / f"{form}.json", 3, shape)
        assert report["verification"]["passed"], form
        assert "BatchNormalization" not in report["ops_after"], form
