"""The report (console table and JSON) and the provenance stamped on the output model.

onnx-graphsurgeon drops node doc_string and model metadata on export, so provenance is
stamped on the exported proto: each node a rule created gets a doc_string naming the rules
and the input model's nodes it replaces; model metadata_props carry the onnxrep version,
the rules applied and the verification result.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxrep.graph import shape_probe
from onnxrep.rule import Applied, Miss
from onnxrep.verify import Verification

META_PREFIX = "onnxrep."


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer))


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PROBE_MAX_ELEMENTS = 64  # larger initializers enter shape inference as typed inputs


def _static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None
                   ) -> dict[str, list[int]] | None:
    """name -> static dims of every tensor onnx shape inference can size, with the graph
    inputs' symbolic dims set to 1 (or taken from `input_shapes`). Large weights are not
    copied: shape inference reads their dims only. None when shape inference fails."""
    probe = shape_probe(
        model, lambda t: int(np.prod(t.dims, dtype=np.int64)) > _PROBE_MAX_ELEMENTS)
    weights = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        given = (input_shapes or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        fixed = list(given) if given is not None else [
            d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        next(p for p in probe.graph.input if p.name == vi.name).CopyFrom(
            onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, fixed))
    del probe.graph.output[:]  # their declared shapes must not constrain inference
    for vi in model.graph.output:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(vi.name))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes, no MAC count
        return None
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
         ) -> int | None:
    """Multiply-accumulates of the Conv / ConvTranspose / Gemm / MatMul nodes for one run, from
    onnx shape inference with symbolic dims set to 1 (or `input_shapes`); None when a shape
    stays unknown."""
    shapes = _static_shapes(model, input_shapes)
    if shapes is None:
        return None
    total = 0
    for node in model.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if a is None or b is None or out is None:
            return None
        if node.op_type == "Conv":  # out * (I/g) * prod(kernel)
            total += int(np.prod(out, dtype=np.int64) * np.prod(b[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":  # each input element meets (O/g) * prod(kernel)
            total += int(np.prod(a, dtype=np.int64) * np.prod(b[1:], dtype=np.int64))
        elif node.op_type == "Gemm":
            reduced = a[0] if any(at.name == "transA" and at.i for at in node.attribute) else a[-1]
            total += int(np.prod(out, dtype=np.int64)) * int(reduced)
        else:  # MatMul
            total += int(np.prod(out, dtype=np.int64)) * int(a[-1])
    return total


@dataclass
class Provenance:
    rules: list[str]
    replaces: list[str]

    def doc(self) -> str:
        return f"onnxrep: {' -> '.join(self.rules)}; replaces {', '.join(self.replaces)}"


def provenance(applied: list[Applied]) -> dict[str, Provenance]:
    """For every node a rule created and that still stands: the chain of rules that built it
    and the input model's nodes it stands for (followed through later rewrites)."""
    made: dict[str, Provenance] = {}
    for record in applied:
        rules: list[str] = []
        replaces: list[str] = []
        for name in record.removed:
            earlier = made.pop(name, None)
            if earlier is None:
                replaces.append(name)
            else:
                rules.extend(r for r in earlier.rules if r not in rules)
                replaces.extend(earlier.replaces)
        rules.append(record.rule)
        for name in record.added:
            made[name] = Provenance(list(dict.fromkeys(rules)), list(dict.fromkeys(replaces)))
    return made


def stamp(model: onnx.ModelProto, report: Report) -> None:
    """Write provenance into the exported proto (node doc_strings, model metadata_props)."""
    made = provenance(report.applied)
    for node in model.graph.node:
        if node.name in made:
            node.doc_string = made[node.name].doc()
    entries = {
        "version": report.version,
        "rules_applied": json.dumps(dict(report.rule_counts)),
        "verification": json.dumps(report.verification_summary()),
    }
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key = META_PREFIX + key
        prop.value = value


@dataclass
class Report:
    version: str
    source: str
    ops_before: Counter[str]
    ops_after: Counter[str] = field(default_factory=Counter)
    params_before: int = 0
    params_after: int = 0
    applied: list[Applied] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    verification: Verification | None = None
    seconds: float = 0.0
    destination: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rule_counts(self) -> Counter[str]:
        return Counter(a.rule for a in self.applied)

    def verification_summary(self) -> dict[str, Any]:
        if self.verification is None:
            return {"status": "skipped"}
        v = self.verification
        return {
            "status": "passed" if v.passed else "failed",
            "worst_rel_l2": v.worst_rel_l2,
            "max_abs": max((o.max_abs for o in v.outputs), default=0.0),
            "rtol": v.rtol,
            "atol": v.atol,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnxrep_version": self.version,
            "source": self.source,
            "destination": self.destination,
            "seconds": round(self.seconds, 4),
            "ops_before": dict(sorted(self.ops_before.items())),
            "ops_after": dict(sorted(self.ops_after.items())),
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "rules_applied": dict(self.rule_counts),
            "verification": None if self.verification is None else self.verification.as_dict(),
            "applied": [a.as_dict() for a in self.applied],
            "near_misses": [m.as_dict() for m in self.misses],
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=float)

    def render(self, explain: bool = False) -> str:
        lines = [f"onnxrep {self.version}: {self.source}"
                 + (f" -> {self.destination}" if self.destination else "")
                 + f"  ({self.seconds:.2f} s)"]
        ops = sorted(set(self.ops_before) | set(self.ops_after),
                     key=lambda o: (-self.ops_before.get(o, 0), o))
        width = max([len(o) for o in ops] + [5])
        lines.append(f"  {'op':<{width}}  {'before':>7}  {'after':>7}")
        for op in ops:
            b, a = self.ops_before.get(op, 0), self.ops_after.get(op, 0)
            lines.append(f"  {op:<{width}}  {b:>7}  {a:>7}")
        lines.append(f"  {'total':<{width}}  {sum(self.ops_before.values()):>7}  "
                     f"{sum(self.ops_after.values()):>7}")
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,}")
        for key, value in self.extra.items():
            if isinstance(value, dict) and {"before", "after"} <= set(value):
                lines.append(f"{key}: {value['before']:,} -> {value['after']:,}")
        counts = self.rule_counts
        applied = ", ".join(f"{r} x{n}" for r, n in counts.items()) or "none"
        lines.append(f"rules applied: {applied}")
        if self.applied:
            unchecked = [a for a in self.applied if not a.checked.startswith("checked")]
            lines.append(f"local checks: {len(self.applied) - len(unchecked)} of "
                         f"{len(self.applied)} rewrites checked against the block they replace"
                         + (f"; unchecked: {len(unchecked)} (--explain lists them)"
                            if unchecked and not explain else ""))
            if explain:
                lines += [f"  {a.rule} ({', '.join(a.added)}): {a.checked}" for a in unchecked]
        lines.append(self._render_verification())
        if explain:
            lines.append(f"near misses: {len(self.misses)}")
            for m in self.misses:
                lines.append(f"  {m.rule} at {m.node}: {m.reason}")
        return "\n".join(lines)

    def _render_verification(self) -> str:
        v = self.verification
        if v is None:
            return "verification: skipped (--no-verify)"
        tol = ("tolerance per dtype" if v.rtol is None and v.atol is None
               else f"rtol {v.rtol if v.rtol is not None else 'per dtype'}, "
                    f"atol {v.atol if v.atol is not None else 'per dtype'}")
        head = f"verification: {'passed' if v.passed else 'FAILED'} ({tol}; {len(v.runs)} runs)"
        by_shape: dict[str, list[str]] = {}
        for run in v.runs:
            shapes = ", ".join(f"{k}{d}" for k, d in run.input_shapes.items())
            failure = "" if run.passed else " FAIL" + (f": {run.error}" if run.error else "")
            by_shape.setdefault(shapes, []).append(run.regime + failure)
        rows = [f"  inputs {shapes}: {', '.join(regimes)}" for shapes, regimes in by_shape.items()]
        rows += [f"  skipped {text}" for text in v.skipped]
        rows += [f"  {name}: {why}" for name, why in v.substituted.items()]
        rows += [f"  {o.name}: max|err| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}"
                 f"  {'ok' if o.passed else 'FAIL'} (rtol {o.rtol:g}, atol {o.atol:g})"
                 for o in v.outputs]
        return "\n".join([head, *rows])
