"""The contract between the engine and a rule file.

A rule is anchored on op types. For each node of those types the engine calls
`match(node, graph)` (structural walk, no mutation), then `check(match)` (a flat list of
failed preconditions, each a human-readable reason), then - only when `check` returned
nothing and no tensor inside the match escapes it - `rewrite(graph, match)`, which mutates
the graph and returns an `Applied` record. A rule never reaches into the engine; the engine
never looks inside a match's roles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx_graphsurgeon as gs


@dataclass
class Match:
    """What `match` bound.

    `nodes` are the nodes the rewrite replaces; `output` is the tensor the replacement
    produces. Every other tensor that a node of `nodes` produces must be consumed only
    inside `nodes` (the engine checks this before any rewrite). `roles` holds the
    rule's own bindings by name.
    """

    anchor: gs.Node
    nodes: list[gs.Node]
    output: gs.Tensor
    roles: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.roles[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.roles[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.roles.get(key, default)


@dataclass
class Miss:
    """A near miss: the structure matched but a precondition failed."""

    rule: str
    node: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "reason": self.reason}


@dataclass
class Applied:
    """What one rewrite did; the report lists every one of these."""

    rule: str
    removed: list[str]
    added: list[str]
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "removed": self.removed, "added": self.added, "why": self.why}


class Rule(Protocol):
    id: str
    summary: str
    anchors: tuple[str, ...]  # op types the engine offers to `match`
    opt_in: bool  # only run when asked for (e.g. --remove-residuals)

    def match(self, node: gs.Node, graph: gs.Graph) -> Match | None: ...

    def check(self, match: Match) -> list[str]: ...

    def rewrite(self, graph: gs.Graph, match: Match) -> Applied: ...
