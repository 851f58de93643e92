"""Numerical evidence that the fused model computes what the input model computes
(docs/DESIGN.md, "Verification").

Two onnxruntime CPU sessions with graph optimizations disabled on both (we test our graph,
not onnxruntime's rewrite of it), fed the same seeded random inputs of the declared dtypes.

Shapes: symbolic dimensions take values from `input_shapes` (name -> dims); when the model
has a symbolic batch dimension it also runs at another batch size, and when it has symbolic
spatial dimensions also at an odd size (the other parity: stride-2 alignment differs). A shape
the *input* model does not run at is not admitted: it is skipped and reported, never held
against the fused model. Symbols given no value take sizes the input model runs at, found by
onnxrep.admissible, and the Verification says which (`automatic`, `shape_search`).
Values: at the first shape, four regimes - standard normal, large magnitude, all negative,
all positive (a wrong bias hides under large values, a wrong Relu under positive ones); at the
other shapes, standard normal.
Per output: max absolute error, relative L2 error, and pass/fail: an output passes when its
relative L2 error is at most rtol, or its max absolute error at most atol (outputs near zero).
Tolerances default per output dtype (`TOLERANCES`): a float16 model rounds 2^13 times more
coarsely than a float32 one, and its exact fusion differs from it by that much.
Discontinuous outputs: an output computed through TopK, ArgMax, NonMaxSuppression, a
comparison, a rounding or a cast to an integer type turns float rounding into a different
selection, so an exact fusion can change it. Such outputs are not compared; the tensors that
feed the first discontinuous ops are compared instead (when the fused model still has them by
name; otherwise the output itself is), and the report says which.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxrep.errors import OnnxrepError, first_line
from onnxrep.io import TWO_GB, SplitModel, save_atomic, serialize

ort.set_default_logger_severity(4)  # onnxruntime's own log lines are not ours to print

DEFAULT_RTOL = 1e-5  # float32 and wider
DEFAULT_ATOL = 1e-6
# (rtol, atol) by output dtype, when not given. float16: unit roundoff 4.9e-4; an exact
# Conv+BN fold of a 72-term sum differs from the unfused model by ~3e-4 relative L2, a bias
# off by 0.05 in one of 16 channels by ~2e-3 (tests/test_verify.py). bfloat16 rounds 8x more
# coarsely still.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-3),
    "bfloat16": (8e-3, 8e-3),
}
REGIMES = ("normal", "large", "negative", "positive")

Dims = dict[str, list[int]]


def tolerance(dtype: np.dtype | str, rtol: float | None, atol: float | None
              ) -> tuple[float, float]:
    """The (rtol, atol) for an output of `dtype`: the ones given, else its dtype's default."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    default = TOLERANCES.get(name, (DEFAULT_RTOL, DEFAULT_ATOL))
    return (default[0] if rtol is None else rtol), (default[1] if atol is None else atol)


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    passed: bool
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


@dataclass
class Run:
    """One comparison: both models on the same inputs of one shape and value regime."""

    input_shapes: Dims
    regime: str
    outputs: list[OutputDiff]
    error: str = ""  # the fused model failed to run here (the input model ran)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


# ops whose output jumps when an input moves by a rounding error
DISCONTINUOUS_OPS = frozenset({
    "TopK", "ArgMax", "ArgMin", "NonMaxSuppression", "Round", "Floor", "Ceil", "Sign",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Mod",
})


@dataclass
class Verification:
    passed: bool
    rtol: float | None  # None: per output dtype (TOLERANCES)
    atol: float | None
    outputs: list[OutputDiff] = field(default_factory=list)  # each output's worst run
    input_shapes: Dims = field(default_factory=dict)  # the first run's
    runs: list[Run] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shapes the input model does not admit
    # symbolic dims given no size (--input-shape): symbol -> the value chosen automatically
    # (the first run's; onnxrep.admissible), and how they were found
    automatic: dict[str, int] = field(default_factory=dict)
    shape_search: str = ""
    # outputs after a discontinuous op -> what was compared in their place, and why
    substituted: dict[str, str] = field(default_factory=dict)

    @property
    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def shapes_verified(self) -> list[Dims]:
        return list({repr(r.input_shapes): r.input_shapes for r in self.runs}.values())

    def as_dict(self) -> dict:
        return asdict(self) | {"worst_rel_l2": self.worst_rel_l2,
                               "shapes_verified": self.shapes_verified}


ModelRef = onnx.ModelProto | SplitModel | str | os.PathLike


def session(model: ModelRef, threads: int = 0, optimize: bool = False,
            spin: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; in-memory models past 2 GB go through a temp file.
    Its threads do not spin-wait between runs unless `spin` (latency benchmarks): spinning
    pools of many small sessions starve the numpy work between their runs on a small machine."""
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4  # onnxruntime's own ERROR lines: we say it in one line
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, onnx.ModelProto | SplitModel):
            split = model if isinstance(model, SplitModel) else SplitModel(model)
            if split.nbytes < TWO_GB:
                return ort.InferenceSession(serialize(split), options, providers=providers)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                save_atomic(split, path, external_data=True)
                return ort.InferenceSession(str(path), options, providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; one line for users
        raise OnnxrepError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> Dims:
    """`name:1,3,224,224` strings -> {name: dims}."""
    shapes: Dims = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxrepError(f"--input-shape '{spec}': expected name:d1,d2,...") from None
    return shapes


def _symbol(dim: object, name: str, axis: int) -> str | None:
    """The symbol a dimension stands for; None for a static one (an unnamed dynamic dim is a
    symbol of its own)."""
    if isinstance(dim, int) and dim > 0:
        return None
    return dim if isinstance(dim, str) and dim else f"{name}:{axis}"


def given_values(args: list, input_shapes: Dims | None) -> dict[str, int]:
    """The symbols `input_shapes` fixes -> their values (one value per symbol across inputs);
    unknown input names and wrong ranks are usage errors."""
    input_shapes = input_shapes or {}
    unknown = set(input_shapes) - {a.name for a in args}
    if unknown:
        raise OnnxrepError(f"--input-shape names unknown inputs: {', '.join(sorted(unknown))}")
    values: dict[str, int] = {}
    for arg in args:
        dims = input_shapes.get(arg.name)
        if dims is None:
            continue
        if len(dims) != len(arg.shape):
            raise OnnxrepError(f"--input-shape {arg.name}: {len(dims)} dims given, model has "
                               f"{len(arg.shape)}")
        for axis, (dim, given) in enumerate(zip(arg.shape, dims, strict=True)):
            symbol = _symbol(dim, arg.name, axis)
            if symbol is not None:
                values.setdefault(symbol, given)
    return values


def dims_with(args: list, input_shapes: Dims | None, chosen: dict[str, int]) -> Dims:
    """Every input's dims: static ones as declared (or given), symbols from `chosen`, else 1."""
    out: Dims = {}
    for arg in args:
        given = (input_shapes or {}).get(arg.name)
        dims = []
        for axis, dim in enumerate(arg.shape):
            symbol = _symbol(dim, arg.name, axis)
            if symbol is None:
                dims.append(given[axis] if given else int(dim))
            else:
                dims.append(chosen.get(symbol, 1))
        out[arg.name] = dims
    return out


def symbol_roles(args: list) -> tuple[set[str], set[str], set[str]]:
    """(batch, spatial, other) symbols: axis 0; axes 2 and up of a rank >= 3 input; the rest.
    A symbol that is a batch dim anywhere is a batch symbol."""
    batch = {s for a in args if len(a.shape) >= 1 and (s := _symbol(a.shape[0], a.name, 0))}
    every = {s for a in args for axis, d in enumerate(a.shape)
             if (s := _symbol(d, a.name, axis))}
    spatial = {s for a in args if len(a.shape) >= 3 for axis, d in enumerate(a.shape)
               if axis >= 2 and (s := _symbol(d, a.name, axis))} - batch
    return batch, spatial, every - batch - spatial


def shape_variants(args: list, input_shapes: Dims | None = None) -> list[Dims]:
    """The input shapes to verify at: the given one (symbolic dims 1 where not given), then
    another batch size when a batch dim is symbolic, then an odd spatial size (the other
    parity) when spatial dims are symbolic. A symbol keeps one value across inputs."""
    values = given_values(args, input_shapes)
    batch, spatial, _ = symbol_roles(args)
    variants = [dims_with(args, input_shapes, values)]
    if batch:
        variants.append(dims_with(args, input_shapes,
                                  values | {s: values.get(s, 1) + 1 for s in batch}))
    if spatial:
        variants.append(dims_with(args, input_shapes, values | {
            s: values.get(s, 1) + (1 if values.get(s, 1) % 2 == 0 else 2) for s in spatial}))
    unique: list[Dims] = []
    for variant in variants:
        if variant not in unique:
            unique.append(variant)
    return unique


def random_inputs(
    sess: ort.InferenceSession, input_shapes: Dims | None = None, seed: int = 0,
    regime: str = "normal",
) -> dict[str, np.ndarray]:
    """Seeded random inputs at `input_shapes` (symbolic dims not given: 1)."""
    dims = shape_variants(sess.get_inputs(), input_shapes)[0]
    rng = np.random.default_rng(seed)
    return {arg.name: random_tensor(rng, arg.type, dims[arg.name], regime)
            for arg in sess.get_inputs()}


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def random_tensor(rng: np.random.Generator, ort_type: str, dims: list[int],
                  regime: str = "normal") -> np.ndarray:
    """Random values of an onnxruntime input type in a value regime (`REGIMES`)."""
    dtype = _ORT_TYPES.get(ort_type)
    if dtype is None:
        raise OnnxrepError(f"cannot make random inputs of type {ort_type}")
    if np.dtype(dtype).kind == "f":
        values = rng.standard_normal(dims)
        if regime == "large":  # ~1e3 (float16: within its range after a few layers)
            values *= regime_scale(regime, dtype)
        elif regime == "negative":
            values = -np.abs(values)
        elif regime == "positive":
            values = np.abs(values)
        return values.astype(dtype)
    if dtype is np.bool_:
        return rng.integers(0, 2, dims).astype(np.bool_)
    return rng.integers(0, 10, dims).astype(dtype)


def regime_scale(regime: str, dtype: np.dtype | type) -> float:
    """How much larger than standard normal the inputs of `regime` are."""
    if regime != "large":
        return 1.0
    return 1e3 if np.dtype(dtype).itemsize > 2 else 30.0


def compare_outputs(
    names: list[str], ref: list[np.ndarray], new: list[np.ndarray], rtol: float | None = None,
    atol: float | None = None, atol_scale: float = 1.0,
) -> list[OutputDiff]:
    """Per output: errors of `new` against `ref`, pass/fail at the tolerance for its dtype.
    `atol_scale`: the inputs' magnitude against standard normal - float rounding is absolute
    in the size of the terms summed, so an output that nearly cancels (a small sum of large
    terms) differs by that much between two exact forms, whatever its own size."""
    diffs = []
    for name, a, b in zip(names, ref, new, strict=True):
        out_rtol, out_atol = tolerance(np.asarray(a).dtype, rtol, atol)
        out_atol *= atol_scale
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, out_rtol, out_atol))
            continue
        if a64.size == 0:
            diffs.append(OutputDiff(name, 0.0, 0.0, True, out_rtol, out_atol))
            continue
        # Positions equal in both (the same inf, or nan in both) count as zero error; an inf
        # or nan in only one of them is an infinite error.
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        with np.errstate(invalid="ignore"):
            err = np.where(same, 0.0, a64 - b64)
        err = np.where(np.isnan(err), np.inf, err)
        max_abs = float(np.max(np.abs(err)))
        norm = float(np.linalg.norm(np.where(np.isfinite(a64), a64, 0.0)))
        rel = float(np.linalg.norm(err) / norm) if norm > 0 else (0.0 if max_abs == 0 else np.inf)
        passed = bool(np.isfinite(max_abs) and (rel <= out_rtol or max_abs <= out_atol))
        diffs.append(OutputDiff(name, max_abs, rel, passed, out_rtol, out_atol))
    return diffs


def _structure(model: ModelRef) -> onnx.ModelProto:
    """The model's graph without the bytes of its large weights."""
    if isinstance(model, SplitModel):
        return model.proto
    if isinstance(model, onnx.ModelProto):
        return model
    from onnxrep.io.wire import read_without_weight_bytes

    return read_without_weight_bytes(Path(model)) or onnx.load(str(model),
                                                               load_external_data=False)


def _is_discontinuous(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)).kind in "iub"
    return node.op_type in DISCONTINUOUS_OPS


def continuous_substitutes(model: onnx.ModelProto) -> dict[str, tuple[list[str], str]]:
    """For every graph output computed through a discontinuous op: the tensors feeding the
    first discontinuous ops of its cone (those with no discontinuous op above them), and
    the ops, as text. Continuous outputs are not in the result."""
    producer = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name for t in model.graph.initializer}
    memo: dict[str, tuple[set[str], set[str]]] = {}

    def cone(tensor: str) -> tuple[set[str], set[str]]:
        """(frontier tensors, discontinuous ops) above `tensor`."""
        if tensor in memo:
            return memo[tensor]
        memo[tensor] = (set(), set())  # a cycle guard; graphs are acyclic
        node = producer.get(tensor)
        frontier: set[str] = set()
        ops: set[str] = set()
        if node is not None:
            above = [cone(i) for i in node.input if i]
            if _is_discontinuous(node) and not any(o for _, o in above):
                frontier = {i for i in node.input if i and i not in constants}
                ops = {f"{node.op_type}({node.name or node.output[0]})"}
            else:
                for f, o in above:
                    frontier |= f
                    ops |= o
        memo[tensor] = (frontier, ops)
        return memo[tensor]

    found = {}
    for out in model.graph.output:
        frontier, ops = cone(out.name)
        if ops:
            found[out.name] = (sorted(frontier), ", ".join(sorted(ops)))
    return found


def _with_outputs(model: ModelRef, names: list[str]) -> ModelRef:
    """`model` with `names` as extra graph outputs (a copy; a file is loaded whole)."""
    if not names:
        return model
    if isinstance(model, SplitModel):
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        copy: ModelRef = SplitModel(proto, model.weights)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        copy = proto
    else:
        proto = onnx.load(str(model))
        copy = proto
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    return copy


def _shapes_text(dims: Dims) -> str:
    return ", ".join(f"{name}{list(d)}" for name, d in dims.items())


def verify(
    reference: ModelRef,
    candidate: ModelRef,
    input_shapes: Dims | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> Verification:
    """Run both models on the same random inputs at every shape of `shape_variants` (every
    value regime at the first) and compare every continuous output, and in place of the others
    the tensors that feed their first discontinuous ops; None tolerances: per output dtype."""
    ref_structure, new_structure = _structure(reference), _structure(candidate)
    outputs = [o.name for o in ref_structure.graph.output]
    if outputs != [o.name for o in new_structure.graph.output]:
        raise OnnxrepError(f"the models' outputs differ: {outputs} vs "
                           f"{[o.name for o in new_structure.graph.output]}")
    substitutes = continuous_substitutes(ref_structure)
    in_fused = {t for n in new_structure.graph.node for t in n.output}
    compared = [o for o in outputs if o not in substitutes]
    substituted: dict[str, str] = {}
    for name, (frontier, ops) in substitutes.items():
        if frontier and all(t in in_fused for t in frontier):
            compared += [t for t in frontier if t not in compared]
            substituted[name] = (f"computed through {ops}: compared {', '.join(frontier)} "
                                 "(what feeds it) instead")
        else:
            compared.append(name)
            substituted[name] = (f"computed through {ops}, compared as is (the fused model "
                                 "does not keep what feeds it)")
    extra = [t for t in compared if t not in outputs]
    del new_structure
    ref_sess = session(_with_outputs(reference, extra))
    new_sess = session(_with_outputs(candidate, extra))
    all_names = [o.name for o in ref_sess.get_outputs()]
    picks = [all_names.index(t) for t in compared]
    ref_names = compared
    inputs = {i.name for i in ref_sess.get_inputs()}
    new_inputs = {i.name for i in new_sess.get_inputs()}
    if new_inputs != inputs:
        raise OnnxrepError(f"the models' inputs differ: {sorted(inputs)} vs {sorted(new_inputs)}")
    args = ref_sess.get_inputs()
    free = _free_symbols(args, input_shapes)
    if any(free):
        variants, skipped, automatic, how = _admissible_variants(
            args, input_shapes, free, ref_structure, ref_sess, all_names, seed)
    else:
        variants, skipped, automatic, how = shape_variants(args, input_shapes), [], {}, ""
    del ref_structure
    plan = [(variants[0], r) for r in REGIMES] + [(v, "normal") for v in variants[1:]]
    runs: list[Run] = []
    for k, (dims, regime) in enumerate(plan):
        feeds = random_inputs(ref_sess, dims, seed + k, regime)
        if k == 0:  # the shape asked for: the input model must run there
            try:
                ref_out = ref_sess.run(all_names, feeds)
            except Exception as exc:  # noqa: BLE001 - one line for users, and the way out
                raise OnnxrepError(
                    f"the input model does not run at {_shapes_text(dims)} (give sizes it "
                    f"admits with --input-shape NAME:D1,D2,...): {first_line(exc)}") from exc
        else:
            try:
                ref_out = ref_sess.run(all_names, feeds)
            except Exception as exc:  # noqa: BLE001 - a shape the input model does not admit
                skipped.append(f"{_shapes_text(dims)}: the input model does not run there "
                               f"({first_line(exc)})")
                continue
        try:
            new_out = new_sess.run(all_names, feeds)
        except Exception as exc:  # noqa: BLE001 - where the input runs, the fused model must
            failed = [OutputDiff(n, float("inf"), float("inf"), False) for n in ref_names]
            runs.append(Run(dims, regime, failed, f"the fused model does not run where the "
                                                  f"input does: {first_line(exc)}"))
            continue
        scale = max([regime_scale(regime, f.dtype) for f in feeds.values()
                     if f.dtype.kind == "f"], default=1.0)
        runs.append(Run(dims, regime, compare_outputs(
            ref_names, [ref_out[i] for i in picks], [new_out[i] for i in picks], rtol, atol,
            scale)))
    worst = [max((r.outputs[i] for r in runs), key=lambda o: (not o.passed, o.rel_l2))
             for i in range(len(ref_names))]
    return Verification(
        passed=all(r.passed for r in runs),
        rtol=rtol,
        atol=atol,
        outputs=worst,
        input_shapes=runs[0].input_shapes,
        runs=runs,
        skipped=skipped,
        substituted=substituted,
        automatic=automatic,
        shape_search=how,
    )


def admissible_shapes(model: ModelRef, input_shapes: Dims | None = None) -> Dims:
    """The input dims to run `model` at: the given ones, and for symbols given no size, the
    first admissible choice of onnxrep.admissible (a one-line error when none is found)."""
    sess = session(model)
    args = sess.get_inputs()
    free = _free_symbols(args, input_shapes)
    if not any(free):
        return shape_variants(args, input_shapes)[0]
    names = [o.name for o in sess.get_outputs()]
    return _admissible_variants(args, input_shapes, free, _structure(model), sess, names, 0)[0][0]


def _failure(error: str) -> str:
    """onnxruntime's run error in a few words: the node that failed, if it names one."""
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", error)
    return f"failed in {node[1]} '{node[2]}'" if node else f"failed: {error[:120]}"


def _free_symbols(args: list, input_shapes: Dims | None) -> tuple[set[str], set[str]]:
    """(batch, non-batch) symbols `input_shapes` gives no value for."""
    given = given_values(args, input_shapes)
    batch, spatial, other = symbol_roles(args)
    return batch - set(given), (spatial | other) - set(given)


def _admissible_variants(
    args: list, input_shapes: Dims | None, free: tuple[set[str], set[str]],
    structure: onnx.ModelProto, sess: ort.InferenceSession, names: list[str], seed: int,
) -> tuple[list[Dims], list[str], dict[str, int], str]:
    """Shapes to verify at when symbols have no given size: found by running the input model
    (onnxrep.admissible). Returns (variants, skipped, symbol -> value chosen, how). No
    admissible shape: a one-line error naming --input-shape and the input."""
    from onnxrep.admissible import search
    from onnxrep.graph import static_shapes

    given = given_values(args, input_shapes)

    def dims_at(values: dict[str, int]) -> Dims:
        return dims_with(args, input_shapes, given | values)

    def run(values: dict[str, int]) -> str | None:
        try:
            sess.run(names, random_inputs(sess, dims_at(values), seed))
        except Exception as exc:  # noqa: BLE001 - a shape the input model does not admit
            return first_line(exc)
        return None

    found = search(*free, structure, run, lambda values: static_shapes(structure,
                                                                       dims_at(values)))
    symbols = sorted(free[0] | free[1])
    if not found.found:
        named = [a for a in args if any(_symbol(d, a.name, i) in symbols
                                        for i, d in enumerate(a.shape))]
        inputs = ", ".join(a.name + "[" + ", ".join(str(d) if d else "?" for d in a.shape) + "]"
                           for a in named)
        example = named[0].name if named else "NAME"
        raise OnnxrepError(
            f"no size found at which the input model runs for the symbolic dims of {inputs} "
            f"(tried {found.runs} shapes in {found.seconds:.1f} s: {found.tried_text()}; the last "
            f"{_failure(found.last_error)}): give them with --input-shape {example}:D1,D2,...")
    variants = [dims_at(v) for v in found.variants]
    skipped = [f"{_shapes_text(dims_at(v))}: the input model does not run there ({error})"
               for v, error in found.rejected]
    how = (f"chosen automatically (no --input-shape): {found.runs} shapes tried in "
           f"{found.seconds:.2f} s" + (f"; from the graph: {'; '.join(found.implied)}"
                                        if found.implied else ""))
    return variants, skipped, {k: found.variants[0][k] for k in symbols}, how
