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

from onnxrep.rule import Applied, Miss
from onnxrep.verify import Verification

META_PREFIX = "onnxrep."


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer))


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
        shapes = ", ".join(f"{k}{v_}" for k, v_ in v.input_shapes.items())
        head = (f"verification: {'passed' if v.passed else 'FAILED'} "
                f"(rtol {v.rtol:g}, atol {v.atol:g}; inputs {shapes})")
        rows = [f"  {o.name}: max|err| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}"
                f"  {'ok' if o.passed else 'FAIL'}" for o in v.outputs]
        return "\n".join([head, *rows])
