"""flatten: a Reshape to a provable [dim0(x), product of the rest] -> Flatten(axis=1); and the
export-based case with global-pool through the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from tests.helpers import (
    cli,
    const,
    expect_fused,
    expect_refused,
    fuse_model,
    make_model,
    node,
    op_counts,
)

RULE = "flatten"
I64 = TensorProto.INT64


def _i64(name: str, values: list[int]) -> TensorProto:
    return const(name, np.array(values, np.int64), np.int64)


def _const_shape(target: list[int], shape: list | None = None, allowzero: int = 0
                 ) -> onnx.ModelProto:
    shape = shape or ["N", 4, 3, 2]
    nodes = [node("Relu", ["x"], ["r"], "relu"),
             node("Reshape", ["r", "s"], ["y"], "reshape", allowzero=allowzero)]
    return make_model(nodes, [("x", shape)], [("y", None)], [_i64("s", target)])


@pytest.mark.parametrize(("target", "allowzero"), [([-1, 24], 0), ([-1, 24], 1), ([0, -1], 0),
                                                   ([0, 24], 0)])
def test_constant_shape_is_a_flatten(target: list[int], allowzero: int) -> None:
    result = fuse_model(_const_shape(target, allowzero=allowzero), input_shapes={"x": [2, 4, 3, 2]})
    expect_fused(result, {"Relu": 1, "Flatten": 1}, {RULE: 1})


@pytest.mark.parametrize(("target", "allowzero", "words"), [
    ([-1, 12], 0, "not [dim 0"), ([-1, 4, 6], 0, "3 dims"), ([2, -1], 0, "not [dim 0"),
    ([24, -1], 0, "not [dim 0"), ([2, 48], 0, "not [dim 0")])
def test_other_constant_shapes_refused(target: list[int], allowzero: int, words: str) -> None:
    result = fuse_model(_const_shape(target, [4, 4, 3, 2], allowzero), verify=False)
    expect_refused(result, RULE, "reshape", words)


def _computed(kind: str, source: str = "x", second: list[int] | None = None,
              shape: list | None = None) -> onnx.ModelProto:
    """Reshape(r, Concat(<dim 0 of `source`>, second)) as the exporters write it."""
    nodes = [node("Relu", ["x"], ["r"], "relu")]
    inits = [_i64("rest", second or [-1]), _i64("zero", [0]), _i64("one", [1]),
             _i64("minus1", [-1])]
    inputs = [("x", shape or ["N", 4, 3, 2]), ("other", ["M", 4])]
    if kind == "gather":  # TorchScript: Shape -> Gather(0) -> Unsqueeze -> Concat
        inits.append(const("idx", np.array(0, np.int64), np.int64))
        nodes += [node("Shape", [source], ["sh"], "shape"),
                  node("Gather", ["sh", "idx"], ["d0"], "gather", axis=0),
                  node("Unsqueeze", ["d0", "zero"], ["d0v"], "unsq")]
    elif kind == "slice":
        nodes += [node("Shape", [source], ["sh"], "shape"),
                  node("Slice", ["sh", "zero", "one"], ["d0v"], "slice")]
    elif kind == "dynamo":  # Shape(start 0, end 1) -> Squeeze -> Reshape([-1])
        nodes += [node("Shape", [source], ["sh"], "shape", start=0, end=1),
                  node("Squeeze", ["sh"], ["d0"], "squeeze"),
                  node("Reshape", ["d0", "minus1"], ["d0v"], "d0v")]
    elif kind == "second_dim":  # picks dim 1, not dim 0
        nodes += [node("Shape", [source], ["sh"], "shape", start=1, end=2)]
        nodes.append(node("Identity", ["sh"], ["d0v"], "ident"))
    nodes += [node("Concat", ["d0v", "rest"], ["target"], "concat", axis=0),
              node("Reshape", ["r", "target"], ["y"], "reshape")]
    return make_model(nodes, inputs, [("y", None)], inits)


@pytest.mark.parametrize("kind", ["gather", "slice", "dynamo"])
@pytest.mark.parametrize("second", [[-1], [24]])
def test_computed_shape_is_a_flatten(kind: str, second: list[int]) -> None:
    result = fuse_model(_computed(kind, second=second),
                        input_shapes={"x": [2, 4, 3, 2], "other": [3, 4]})
    expect_fused(result, {"Relu": 1, "Flatten": 1}, {RULE: 1})


def test_dim0_of_another_tensor_refused() -> None:
    """`other` has its own batch M: its dim 0 is not x's."""
    result = fuse_model(_computed("gather", source="other"), verify=False)
    expect_refused(result, RULE, "not [N, static")


def test_other_dim_refused() -> None:
    result = fuse_model(_computed("second_dim", second=[-1]), verify=False)
    expect_refused(result, RULE, "reshape", "not [dim 0")


def test_wrong_product_refused() -> None:
    result = fuse_model(_computed("gather", second=[12]), verify=False)
    expect_refused(result, RULE, "not [dim 0")


def test_symbolic_rest_with_computed_dim_refused() -> None:
    """The shape source has a symbolic non-batch dim: the proof does not read it."""
    result = fuse_model(_computed("gather", shape=["N", 4, "H", 2]), verify=False)
    expect_refused(result, RULE, "not [N, static")


# --- export-based: x.mean((2, 3), keepdim=True) then x.view(x.size(0), -1) / flatten(1) ----

FORMS = ("ts-unfolded", "dynamo", "dynamo-noopt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    from models.export import export_forms

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
            return self.fc(t.view(t.size(0), -1))

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flatten")
    return export_forms(Head(), (2, 3, 16, 16), {f: folder / f"head-{f}.onnx" for f in FORMS})


@pytest.mark.torch
@pytest.mark.parametrize("form", FORMS)
def test_export_head_is_pool_and_flatten(form: str, exported: dict, tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = cli("fuse", exported[form], out, "--report", report_path, "-q",
               "--input-shape", "input:3,3,16,16")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"]
    counts = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    expected = {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert counts == Counter({k: v for k, v in expected.items() if v}), counts


def test_a_dim_named_like_the_batch_marker_is_not_taken_for_the_batch() -> None:
    """x[N, 1] -> Transpose -> t[1, N] -> Reshape(Concat(Shape(x)[0:1], [-1])) is [N, 1], not
    Flatten(t) = [1, N]: x's dim literally named "N" once compared equal to the shape
    arithmetic's batch marker (found by tests/test_shape_names_fuzz.py)."""
    nodes = [node("Transpose", ["x"], ["t"], "swap", perm=[1, 0]),
             node("Shape", ["x"], ["n"], "shape_of", start=0, end=1),
             node("Concat", ["n", "rest"], ["s"], "cat", axis=0),
             node("Reshape", ["t", "s"], ["y"], "view"),
             node("Relu", ["y"], ["out"], "post")]
    model = make_model(nodes, [("x", ["N", 1])], [("out", None)],
                       [const("rest", np.array([-1]), np.int64)])
    result = fuse_model(model, input_shapes={"x": [3, 1]})
    assert result.verified
    assert "Flatten" not in op_counts(result.model)
