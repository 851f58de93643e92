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

from onnxrep.graph import static_shapes
from onnxrep.rule import Applied, Miss
from onnxrep.verify import Verification

META_PREFIX = "onnxrep."


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer))


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
         ) -> int | None:
    """Multiply-accumulates of the Conv / ConvTranspose / Gemm / MatMul nodes for one run, from
    onnx shape inference with symbolic dims set to 1 (or `input_shapes`); None when a shape
    stays unknown."""
    shapes = static_shapes(model, input_shapes)
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
    rules: dict[str, set[int]]  # rule id -> the rewrites (indices into `applied`) behind it
    replaces: list[str]

    def doc(self) -> str:
        """Short, whatever the node stands for (a merged Conv of a large model replaces
        hundreds of nodes): rule ids with a count and how many input nodes; the full lists
        are in the JSON report's `applied` records."""
        rules = ", ".join(f"{rule} x{len(done)}" for rule, done in self.rules.items())
        return f"onnxrep: {rules}; {len(self.replaces)} input nodes"


def provenance(applied: list[Applied]) -> dict[str, Provenance]:
    """For every node a rule created and that still stands: the rules that built it (with
    how many of their rewrites) and the input model's nodes it stands for (followed through
    later rewrites)."""
    made: dict[str, Provenance] = {}
    for index, record in enumerate(applied):
        rules: dict[str, set[int]] = {}
        replaces: list[str] = []
        for name in record.removed:
            earlier = made.pop(name, None)
            if earlier is None:
                replaces.append(name)
            else:  # a rewrite that made two nodes counts once
                for rule, done in earlier.rules.items():
                    rules.setdefault(rule, set()).update(done)
                replaces.extend(earlier.replaces)
        rules.setdefault(record.rule, set()).add(index)
        for name in record.added:
            made[name] = Provenance(rules, list(dict.fromkeys(replaces)))
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
    target: dict[str, Any] | None = None  # --target/--opset: name, opset, op warnings

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
            "target": self.target,
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
        left = self.ops_after.get("BatchNormalization", 0)
        if left:  # each has a near miss of propagate-affine saying why (docs/RULES.md)
            lines.append(f"BatchNormalization left: {left}"
                         + ("" if explain else " (--explain says why)"))
        if self.applied:
            unchecked = [a for a in self.applied if not a.checked.startswith("checked")]
            lines.append(f"local checks: {len(self.applied) - len(unchecked)} of "
                         f"{len(self.applied)} rewrites checked against the block they replace"
                         + (f"; unchecked: {len(unchecked)} (--explain lists them)"
                            if unchecked and not explain else ""))
            if explain:
                lines += [f"  {a.rule} ({', '.join(a.added)}): {a.checked}" for a in unchecked]
        if self.target is not None:
            lines.append(f"target: {self.target['name']} (opset {self.target['opset']})")
            lines += [f"  warning: {w}" for w in self.target["warnings"]]
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
        rows = [f"  symbolic dims {', '.join(f'{k}={n}' for k, n in v.automatic.items())} "
                f"{v.shape_search}"] if v.automatic else []
        rows += [f"  inputs {shapes}: {', '.join(regimes)}" for shapes, regimes in by_shape.items()]
        rows += [f"  skipped {text}" for text in v.skipped]
        rows += [f"  {name}: {why}" for name, why in v.substituted.items()]
        rows += [f"  {o.name}: max|err| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}"
                 f"  {'ok' if o.passed else 'FAIL'} (rtol {o.rtol:g}, atol {o.atol:g})"
                 for o in v.outputs]
        return "\n".join([head, *rows])
