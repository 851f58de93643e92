"""Deployment targets: the runtimes a fused model is handed to, and `fit_to_target`, the
final step that fits the output to one of them (docs/DESIGN.md, "Targets").

A `Target` records the opset onnxrep writes for the runtime unless `--opset` says otherwise,
the lowest opset onnxrep emits, and the ops that the runtime's documented ONNX operator support
covers only through a fallback (op -> the fallback, one line). The tables cover the ops
onnxrep's outputs are made of (`CHECKED_OPS`: the fused models/ families in every export form,
what opset conversion emits, and the common CNN ops that pass through); an op outside them is
reported as unchecked for that target, never silently passed.

Sources (each runtime's own documentation, as of this writing):
  onnxruntime  ONNX Runtime's operator kernels list (every ai.onnx op from opset 7 on);
  ort-mobile   ONNX Runtime's "ORT Mobile Pre-Built Package Operator and Type Support" pages
               (the reduced op set of the pre-built mobile packages; Erf from 1.11 on);
  openvino     OpenVINO's supported ONNX operators list ("Supported Operations - by Framework
               Frontend");
  tensorrt     onnx-tensorrt's operators.md (opset <= 17 for the 8.x parsers; Clip bounds
               must be initializers, as fused outputs have them; INT64 cast down to INT32);
  ncnn         ncnn's operator list and pnnx's ONNX import (ncnn has no batch axis and no erf
               unary op: pnnx fuses the GELU pattern around Erf);
  mnn          MNN's supported ONNX operators list (the converter's "OnnxOps" list);
  tflite       onnx2tf's supported ONNX operators table and LiteRT's builtin op list (Erf has
               no builtin: it needs select-TF ops, "FlexErf").

What `fit_to_target` does, each step exact (the whole model is then verified like any rewrite):
  1. shapes: a Reshape whose shape is computed at run time (Shape -> ... -> Concat, the
     dynamic-batch flatten of the dynamo exporter) gets a constant shape when onnx shape
     inference gives every output dim but at most one (that one becomes -1: the element count
     decides it). The INT64 data initializers of the dead computation go with it. INT64
     initializers that remain are those the ONNX spec types as int64 (a Reshape's shape, axes,
     pads, split, starts/ends): they are not weights and no runtime needs them changed.
  2. opset: `onnxrep.opset.convert` to the target's opset (or `opset`): ReduceMean's axes input
     becomes the attribute below 18, and so on (see that module). The target's default is a
     preference: an op with no exact form there keeps the model's opset, with a warning;
     an `opset` asked for is an error then.
  3. ops: one warning per op type the target runs only through a fallback.
A spatial ReduceMean becomes a GlobalAveragePool in the rules (global-pool), before this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxrep import opset as opset_mod
from onnxrep.errors import OnnxrepError

DEFAULT_TARGET = "onnxruntime"
MIN_OPSET = 13  # the lowest opset onnxrep converts to (onnxrep/opset.py)
MAX_OPSET = 18  # the opset of the exports onnxrep is built for; no upward conversion


# The ops the tables below were checked for: the fused models/ families in every export form,
# what opset conversion emits, and common CNN ops that pass through unchanged.
CHECKED_OPS = frozenset("""
    Add BatchNormalization Cast Clip Concat Constant Conv ConvTranspose Div Erf Flatten Gather
    Gemm GlobalAveragePool GlobalMaxPool HardSigmoid HardSwish Identity LeakyRelu MatMul
    MaxPool AveragePool Mul Pad PRelu ReduceMean Relu Reshape Resize Shape Sigmoid Slice
    Softmax Split Squeeze Sub Tanh Transpose Unsqueeze
""".split())


@dataclass(frozen=True)
class Target:
    name: str
    default_opset: int | None  # None: keep the model's own opset (unless --opset)
    min_opset: int
    unsupported_ops: dict[str, str] = field(default_factory=dict)  # op -> reason / fallback
    notes: str = ""
    all_standard_ops: bool = False  # documents every ai.onnx op: nothing is unchecked


_NO_BATCH = "ncnn has no batch axis: pnnx folds it at the traced input shape"
TARGETS: dict[str, Target] = {
    "onnxruntime": Target("onnxruntime", None, MIN_OPSET, {}, "the reference runtime",
                          all_standard_ops=True),
    "ort-mobile": Target(
        "ort-mobile", None, MIN_OPSET,
        {"HardSwish": "not in the pre-built mobile package before 1.12: a custom build",
         "Erf": "not in the pre-built mobile package before 1.11: a custom build"},
        "the .ort format; the pre-built mobile packages carry a reduced op set"),
    "openvino": Target("openvino", None, MIN_OPSET, {}, "ONNX frontend, every op of the list",
                       all_standard_ops=True),
    "tensorrt": Target(
        "tensorrt", 17, MIN_OPSET, {},
        "8.x parsers take opset <= 17 and ignore a ReduceMean axes input before 10.0; INT64 "
        "is cast down to INT32"),
    "ncnn": Target(
        "ncnn", 17, MIN_OPSET,
        {"Erf": "no ncnn layer: runs only where pnnx fuses the GELU pattern around it",
         "Shape": _NO_BATCH, "Gather": _NO_BATCH, "Squeeze": _NO_BATCH,
         "Unsqueeze": _NO_BATCH, "BatchNormalization": "kept as a layer (not folded into a "
                                                       "Conv by onnxrep)"},
        "through pnnx; fp32 weights need pnnx fp16=0; opset 17: pnnx reads a one-element "
        "axes input of ReduceMean-18 as an int and ncnn's Reduction then reduces nothing"),
    "mnn": Target("mnn", None, MIN_OPSET, {}, "MNN converter, every op of the list"),
    "tflite": Target(
        "tflite", None, MIN_OPSET,
        {"Erf": "no LiteRT builtin: needs select-TF ops (FlexErf), or onnx2tf's GELU "
                "replacement",
         "ConvTranspose": "onnx2tf builds TRANSPOSE_CONV with an explicit output shape: a "
                          "dynamic batch is fixed"},
        "through onnx2tf (NHWC); LiteRT builtin ops"),
}


def get_target(name: str) -> Target:
    """The target called `name`; an OnnxrepError naming the known ones otherwise."""
    if name not in TARGETS:
        raise OnnxrepError(f"unknown target '{name}' (one of: {', '.join(TARGETS)})")
    return TARGETS[name]


def target_opset(model: onnx.ModelProto, target: str, opset: int | None) -> int:
    """The opset to write: `opset`, else the target's default where the model is newer, else
    the model's own. One line (OnnxrepError) for an opset onnxrep cannot emit."""
    spec = get_target(target)
    current = opset_mod.model_opset(model)
    if opset is None:
        return min(current, spec.default_opset) if spec.default_opset else current
    if not spec.min_opset <= opset <= MAX_OPSET:
        raise OnnxrepError(f"--opset {opset}: onnxrep writes opsets {spec.min_opset} to "
                           f"{MAX_OPSET} for {spec.name}")
    return opset


def op_warnings(model: onnx.ModelProto, target: str) -> list[str]:
    """One line per op type of `model` that `target` runs only through a fallback, or that
    onnxrep's table for it does not cover."""
    spec = get_target(target)
    lines = []
    for op in sorted({n.op_type for n in model.graph.node}):
        domain = next(n.domain for n in model.graph.node if n.op_type == op)
        if domain not in opset_mod.DEFAULT_DOMAINS:
            lines.append(f"{op} ({domain}): a custom-domain op; {spec.name} needs its own "
                         "kernel")
        elif op in spec.unsupported_ops:
            lines.append(f"{op}: {spec.unsupported_ops[op]}")
        elif op not in CHECKED_OPS and not spec.all_standard_ops:
            lines.append(f"{op}: not in onnxrep's table for {spec.name}; check its documented "
                         "ONNX operator list")
    return lines


def constant_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Step 1 (module docstring): a copy in which each Reshape whose shape is computed, and
    whose output onnx infers up to at most one dim, reads a constant INT64 shape instead; the
    computation left dead is dropped."""
    shapes = opset_mod.tensor_types(model)[1]
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    fitted = onnx.ModelProto()
    fitted.CopyFrom(model)
    names = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node for o in [*n.input, *n.output]}
    changed = False
    for node in fitted.graph.node:
        if node.op_type != "Reshape" or node.domain not in opset_mod.DEFAULT_DOMAINS:
            continue
        if len(node.input) < 2 or node.input[1] in constants:
            continue
        shape = shapes.get(node.output[0])
        if shape is None:
            continue
        dims = [d if isinstance(d, int) else -1 for d in shape]
        if dims.count(-1) > 1 or 0 in dims:  # -1 beside a 0 is ambiguous
            continue
        name, k = node.input[1] + "_const", 1
        while name in names:
            k += 1
            name = f"{node.input[1]}_const_{k}"
        names.add(name)
        fitted.graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
        node.input[1] = name
        # no 0 in the shape: allowzero no longer matters, and opset < 14 does not know it
        kept = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend(kept)
        changed = True
    if changed:
        _drop_dead(fitted)
    return fitted


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes whose outputs nobody reads (ONNX ops have no side effects), then initializers
    nobody reads; graph inputs and outputs stay."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        live = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    read = {i for n in graph.node for i in n.input} | outputs | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fit_to_target(model: onnx.ModelProto, target: str, opset: int | None
                  ) -> tuple[onnx.ModelProto, list[str]]:
    """`model` fitted to `target` (a new proto; the input is not changed) and one warning line
    per op that needs a fallback there. `opset` None: the target's default. Large weights
    may be placeholders without bytes (a SplitModel's proto): they are passed along.
    OnnxrepError (one line) for an opset out of range or an op with no exact form there."""
    version = target_opset(model, target, opset)
    fitted = constant_shapes(model)
    try:
        converted = opset_mod.convert(fitted, version)
    except OnnxrepError as exc:
        if opset is not None or version == opset_mod.model_opset(fitted):
            raise
        # the target's default opset is a preference (docs/DESIGN.md, "Targets"): keep the
        # model's own, and say why
        return fitted, [f"opset {version} ({get_target(target).name}'s default) not written: "
                        f"{exc}", *op_warnings(fitted, target)]
    return converted, op_warnings(converted, target)
