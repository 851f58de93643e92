"""Property (hypothesis): the dims onnxrep writes (value_info) and the reshapes it removes hold
at every batch size. Random chains of data-movement ops over x[N, d1.., dk] - Relu,
Transpose (moving N too), Reshape to a constant regrouping (-1 anywhere, 0 copying a dim),
Reshape to Concat(Shape(t)[0:1], rest) (the dynamo export's view(B, ...)), Flatten,
Unsqueeze / Squeeze of a size-1 axis - each valid for every N >= 1, exercise the two proofs
by element count: graph._reshape_symbols (a Reshape's -1 named N) and reshape-chain's
_keeps_shape (a Reshape that matches its input's dims at all places but one is removed).

Every drawn graph: onnxrep.fuse verifies; at N in 1, 2, 3, 5 onnxruntime (optimizations
off) runs the fused model with every value_info tensor as an extra output, and each written
dim is the runtime one (a static size equal, "N" equal to N, no other name written); the
outputs equal the input model's exactly. ONNXREP_SHAPE_FUZZ_EXAMPLES sets the count (default
40 here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from unittest import mock

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxrep import graph as onnxrep_graph
from tests.helpers import fuse_model, session

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("ONNXREP_SHAPE_FUZZ_EXAMPLES", "40"))
SIZES = (1, 2, 3, 5)
MAX_RANK = 6


@dataclass(frozen=True)
class Dims:
    """A tensor's dims: `sizes[npos]` is the multiplier m of the one dim N*m, the others are
    static sizes (every op here keeps exactly one dim that holds N)."""

    sizes: tuple[int, ...]
    npos: int

    @property
    def rank(self) -> int:
        return len(self.sizes)

    @property
    def count(self) -> int:  # the element count over N
        return int(np.prod(self.sizes))

    def at(self, n: int) -> tuple[int, ...]:
        return tuple(s * n if k == self.npos else s for k, s in enumerate(self.sizes))

    def text(self) -> str:
        return "[" + ", ".join((f"N*{s}" if s > 1 else "N") if k == self.npos else str(s)
                               for k, s in enumerate(self.sizes)) + "]"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factors(draw: st.DrawFn, total: int, slots: int) -> list[int]:
    """`slots` positive ints whose product is `total`."""
    out = []
    for _ in range(slots - 1):
        d = draw(st.sampled_from(_divisors(total)))
        out.append(d)
        total //= d
    return [*out, total] if slots else []


class Chain:
    def __init__(self, draw: st.DrawFn, dims: Dims) -> None:
        self.draw, self.nodes, self.inits, self.k = draw, [], [], 0
        self.tensors: dict[str, Dims] = {"x": dims}
        self.steps: list[str] = []
        self.values: dict[str, list[int]] = {}  # the constants, for the steps' text

    def name(self, hint: str) -> str:
        self.k += 1
        return f"{hint}{self.k}"

    def const(self, values: list[int]) -> str:
        name = self.name("s")
        self.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        self.values[name] = values
        return name

    def op(self, op: str, inputs: list[str], dims: Dims | None, **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        if dims is not None:
            self.tensors[out] = dims
            args = [str(self.values.get(i, i)) for i in inputs]
            args += [f"{k}={v}" for k, v in attrs.items()]
            self.steps.append(f"{out} = {op}({', '.join(args)}) -> {dims.text()}")
        return out

    # --- the ops ------------------------------------------------------------------------

    def transpose(self, t: str) -> str:
        d = self.tensors[t]
        perm = self.draw(st.permutations(list(range(d.rank))))
        return self.op("Transpose", [t], Dims(tuple(d.sizes[p] for p in perm),
                                               perm.index(d.npos)), perm=list(perm))

    def flatten(self, t: str) -> str:
        d = self.tensors[t]
        axis = self.draw(st.sampled_from([1, *range(d.rank + 1)]))
        new = (int(np.prod(d.sizes[:axis])), int(np.prod(d.sizes[axis:])))
        return self.op("Flatten", [t], Dims(new, 0 if d.npos < axis else 1), axis=axis)

    def unsqueeze(self, t: str) -> str:
        d = self.tensors[t]
        axis = self.draw(st.integers(-d.rank - 1, d.rank))
        pos = axis % (d.rank + 1)
        sizes = (*d.sizes[:pos], 1, *d.sizes[pos:])
        return self.op("Unsqueeze", [t, self.const([axis])],
                       Dims(sizes, d.npos + (pos <= d.npos)))

    def squeeze(self, t: str) -> str:
        d = self.tensors[t]
        ones = [k for k, s in enumerate(d.sizes) if s == 1 and k != d.npos]
        pos = self.draw(st.sampled_from(ones))
        axis = self.draw(st.sampled_from([pos, pos - d.rank]))
        sizes = d.sizes[:pos] + d.sizes[pos + 1:]
        return self.op("Squeeze", [t, self.const([axis])], Dims(sizes, d.npos - (pos < d.npos)))

    def new_dims(self, d: Dims) -> Dims:
        """A random shape of the same element count: d itself, d with one place changed (no
        other shape has the count, so d again), or any regrouping."""
        kind = self.draw(st.sampled_from(["same", "regroup", "regroup", "merge", "split"]))
        if kind == "same":
            return d
        if kind == "merge" and d.rank >= 2:  # two neighbours into one
            k = self.draw(st.integers(0, d.rank - 2))
            npos = d.npos - (d.npos > k)
            return Dims((*d.sizes[:k], d.sizes[k] * d.sizes[k + 1], *d.sizes[k + 2:]), npos)
        if kind == "split" and d.rank < MAX_RANK:  # one into two
            k = self.draw(st.integers(0, d.rank - 1))
            a = self.draw(st.sampled_from(_divisors(d.sizes[k])))
            parts = (a, d.sizes[k] // a)
            npos = d.npos + (d.npos > k)
            if k == d.npos:  # N stays with one half
                npos = d.npos + self.draw(st.integers(0, 1))
            return Dims((*d.sizes[:k], *parts, *d.sizes[k + 1:]), npos)
        rank = self.draw(st.integers(1, 5))
        npos = self.draw(st.integers(0, rank - 1))
        m = self.draw(st.sampled_from(_divisors(d.count))) if rank > 1 else d.count
        rest = _factors(self.draw, d.count // m, rank - 1)
        return Dims((*rest[:npos], m, *rest[npos:]), npos)

    def reshape(self, t: str, computed: bool) -> str:
        """Reshape(t, target) to a random shape of t's count, valid at every N. Each entry of
        the target: its size as a constant, a 0 copying t's dim there (allowzero=0), the one
        -1, or (computed) Shape(u)[j:j+1] of a tensor u so far whose dim j is the size at
        every N - N's entry too (the dynamo export's view(B, ...) reads Shape(x)[0:1]);
        the target is then Concat of the pieces. N's entry is -1, a 0 or a Shape; a -1 may
        stand elsewhere when it is not."""
        d = self.tensors[t]
        new = d if computed and self.draw(st.booleans()) else self.new_dims(d)
        allowzero = self.draw(st.sampled_from([0, 0, 1]))

        def copies(k: int) -> bool:  # a 0 at k copies t's dim k, the one wanted there
            return (not allowzero and k < d.rank and (k == d.npos) == (k == new.npos)
                    and d.sizes[k] == new.sizes[k])

        def shapes(k: int) -> list[tuple[str, int]]:  # the (u, j) whose dim j is new's dim k
            if not computed:
                return []
            return [(u, j) for u, e in sorted(self.tensors.items()) for j in range(e.rank)
                    if (j == e.npos) == (k == new.npos) and e.sizes[j] == new.sizes[k]]

        kinds = ["-1"] + ["0"] * copies(new.npos) + ["shape"] * (2 * bool(shapes(new.npos)))
        n_kind = self.draw(st.sampled_from(kinds))
        minus = new.npos
        if n_kind != "-1":
            minus = self.draw(st.sampled_from([None, *[k for k in range(new.rank)
                                                       if k != new.npos]]))
        pieces: list[int | tuple[str, int]] = []
        for k, size in enumerate(new.sizes):
            if k == minus:
                pieces.append(-1)
                continue
            kinds = ([n_kind] if k == new.npos else
                     ["const", "const"] + ["0"] * copies(k) + ["shape"] * bool(shapes(k)))
            kind = self.draw(st.sampled_from(kinds))
            pieces.append(0 if kind == "0" else size if kind == "const" else
                          self.draw(st.sampled_from(shapes(k))))
        attrs = {"allowzero": 1} if allowzero else {}
        if all(isinstance(p, int) for p in pieces):
            return self.op("Reshape", [t, self.const(pieces)], new, **attrs)
        parts, run, text = [], [], []
        for p in [*pieces, None]:
            if isinstance(p, int):
                run.append(p)
                continue
            if run:
                parts.append(self.const(run))
                text.append(str(run))
                run = []
            if p is not None:
                u, j = p
                parts.append(self.op("Shape", [u], None, start=j, end=j + 1))
                text.append(f"Shape({u})[{j}:{j + 1}]")
        shape = self.op("Concat", parts, None, axis=0)
        self.steps.append(f"{shape} = Concat({', '.join(text)})")
        return self.op("Reshape", [t, shape], new, **attrs)

    def step(self, t: str) -> str:
        d = self.tensors[t]
        ops = ["relu", "transpose", "reshape", "reshape", "computed", "computed", "flatten"]
        if d.rank < MAX_RANK:
            ops.append("unsqueeze")
        if any(s == 1 and k != d.npos for k, s in enumerate(d.sizes)) and d.rank > 1:
            ops.append("squeeze")
        kind = self.draw(st.sampled_from(ops))
        if kind == "relu":
            return self.op("Relu", [t], d)
        if kind in ("reshape", "computed"):
            return self.reshape(t, kind == "computed")
        return getattr(self, kind)(t)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        x = self.tensors["x"]
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *x.sizes[1:]])],
            [helper.make_empty_tensor_value_info(o) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]  # declared as onnx infers them, like an exporter
        model.graph.output.extend(inferred.graph.output)
        return model


@st.composite
def shape_chains(draw: st.DrawFn) -> tuple[onnx.ModelProto, Chain, list[str]]:
    rest = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    chain = Chain(draw, Dims((1, *rest), 0))
    t, outputs = "x", []
    for _ in range(draw(st.integers(1, 5))):
        t = chain.step(t)
        if draw(st.integers(0, 5)) == 0:  # an inner tensor that is also an output
            outputs.append(t)
    if t not in outputs:
        outputs.append(t)
    model = chain.model(outputs)
    onnx.checker.check_model(model, full_check=True)
    return model, chain, outputs


def _written(info: onnx.ValueInfoProto) -> list | None:
    tt = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param")
            else None for d in tt.shape.dim]


def _with_every_tensor_out(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy of `model` that also outputs every value_info tensor (the output's type
    without dims: the written dims stay in value_info, as in the model); and the
    (name, written dims) of the value_info."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = {o.name for o in probe.graph.output}
    written = []
    for vi in probe.graph.value_info:
        dims = _written(vi)
        if dims is None:
            continue
        written.append((vi.name, dims))
        if vi.name not in outs:
            probe.graph.output.append(helper.make_tensor_value_info(
                vi.name, vi.type.tensor_type.elem_type, None))
            outs.add(vi.name)
    return probe, written


def _check_dims(name: str, dims: list, actual: tuple[int, ...], n: int, graph: str,
                names: tuple[str, ...] = ("N",)) -> None:
    where = f"{name} written {dims}, is {list(actual)} at N={n}\n{graph}"
    assert len(dims) == len(actual), where
    for k, (d, a) in enumerate(zip(dims, actual, strict=True)):
        if isinstance(d, str):
            assert d in names, f"dim {k}: name {d!r} (only the input's N may be written): {where}"
            assert a == n or d != "N", f"dim {k} is named N: {where}"
        elif isinstance(d, int):
            assert a == d, f"dim {k} is static: {where}"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(shape_chains())
def test_written_dims_and_removed_reshapes_hold_at_every_batch(drawn: tuple) -> None:
    model, chain, outputs = drawn
    x = chain.tensors["x"]
    graph_text = "\n".join([f"x -> {x.text()}", *chain.steps, f"outputs: {outputs}"])
    named, reshape_symbols = [], onnxrep_graph._reshape_symbols

    def counting(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:  # for the statistics
        seeds = reshape_symbols(m)
        named.extend(seeds)
        return seeds

    with mock.patch.object(onnxrep_graph, "_reshape_symbols", counting):
        result = fuse_model(model, input_shapes={"x": list(x.at(2))})
    applied = [(a.rule, a.why) for a in result.report.applied]
    assert result.verified, f"{graph_text}\napplied: {applied}\n{result.report.verification}"
    fired = sorted({a.rule for a in result.report.applied})
    event(f"rules: {', '.join(fired) or 'none'}")
    event(f"_reshape_symbols named a -1: {bool(named)}")
    identities = [a.why for a in result.report.applied if a.why.endswith(": removed")]
    event(f"reshape-chain identities: {len(identities)} "
          f"({sum(chr(39) in w for w in identities)} to a computed shape)")
    fused = result.model
    probe, written = _with_every_tensor_out(fused)
    event(f"value_info dims named N: {sum(d == 'N' for _, ds in written for d in ds) > 0}")
    declared = {o.name: o for o in model.graph.output}
    written_out = {o.name: o for o in fused.graph.output}
    ref, out, seen = session(model), session(probe), session(fused)
    names = [o.name for o in probe.graph.output]
    for n in SIZES:
        feed = {"x": np.random.default_rng(n).standard_normal(x.at(n)).astype(np.float32)}
        values = dict(zip(names, out.run(None, feed), strict=True))
        for name, dims in written:
            _check_dims(name, dims, values[name].shape, n, graph_text)
        got = dict(zip([o.name for o in fused.graph.output], seen.run(None, feed), strict=True))
        assert sorted(got) == sorted(outputs), (sorted(got), graph_text)
        for name, want in zip(outputs, ref.run(None, feed), strict=True):
            assert want.shape == chain.tensors[name].at(n), (name, want.shape, graph_text)
            # a graph output keeps its declaration (onnx's inference here, made-up names too)
            dims = _written(declared[name])
            assert _written(written_out[name]) == dims, (name, written_out[name], graph_text)
            _check_dims(name, dims, got[name].shape, n, graph_text,
                        tuple(d for d in dims if isinstance(d, str)))
            np.testing.assert_array_equal(got[name], want,
                                          err_msg=f"{name} at N={n}\n{graph_text}")
