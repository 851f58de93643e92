"""The contract between the engine and a rule (docs/DESIGN.md, "The rule contract").

A rule is anchored on op types. For each node of those types the engine calls, in turn:

    match(graph, node)   -> Match | None          structural walk; reads, never writes
    check(graph, match)  -> Plan | Refusal         every precondition; the rule's own plan
    rewrite(graph, plan) -> Replacement            a *description* of the new nodes

None of the three mutates the graph: the engine alone applies a Replacement (validation,
naming, rewiring, cleanup, freeing dead weights), so a rule that raises changes nothing. A
`Refusal` carries the reason that `--explain` and the JSON report show; the engine turns an
exception inside a rule into a refusal naming the rule and the node.

Each rule defines its own small `@dataclass` Match (a subclass of `Match`, with typed fields
for what it bound) and its own Plan (any dataclass); the engine reads neither beyond the base
fields of `Match`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Match:
    """What `match` bound: the anchor, and the nodes a rewrite of it would replace.

    `nodes` is what the engine uses to cache a refusal (their tensors are the match's
    neighbourhood); a rule's own fields live in its subclass.
    """

    anchor: gs.Node
    nodes: list[gs.Node]


@dataclass(frozen=True)
class Refusal:
    """A failed precondition, in words that name the tensor or node at fault."""

    reason: str

    @staticmethod
    def first(*reasons: Refusal | None) -> Refusal | None:
        """The first refusal among the arguments (facts return None when they hold)."""
        return next((r for r in reasons if r is not None), None)


@dataclass(eq=False)
class NewValue:
    """A tensor the replacement computes (the engine gives it a fresh name from `hint`)."""

    hint: str
    dtype: Any = None


@dataclass(eq=False)
class NewWeight:
    """A constant the replacement adds (the engine gives it a fresh name from `hint`)."""

    hint: str
    values: np.ndarray


# What a new node may read: a tensor of the graph as it is, a value computed by an earlier
# new node, or a new constant.
Input = Union[gs.Tensor, NewValue, NewWeight]  # noqa: UP007 - also a runtime alias


@dataclass(eq=False)
class NewNode:
    """One node of a replacement.

    `outputs` are NewValues, or tensors of the graph that a replaced node produces now: the
    new node takes over producing them (their names, readers and graph-output status stay).
    `name` is the preferred name; the engine makes it unique once the replaced nodes are gone,
    so a merged Conv keeps the name of the Conv it stands for.
    """

    op: str
    name: str
    inputs: list[Input]
    outputs: list[gs.Tensor | NewValue]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replacement:
    """`removes` go, `nodes` come (in order: a node reads only earlier nodes' NewValues).

    Every tensor that a removed node produces must either be produced by a new node or be
    read only by removed nodes (and not be a graph output); the engine checks this, and
    everything else, before it changes anything.
    """

    removes: list[gs.Node]
    nodes: list[NewNode]
    why: str
    # boundary tensors the rewrite is exact for only because the rule proved them >= 0
    # (onnxrep.nonnegative, e.g. remove-residual's block input under a Relu): a check that
    # samples the block on its own must feed them values >= 0
    nonnegative_inputs: list[gs.Tensor] = field(default_factory=list)


@dataclass
class Miss:
    """A near miss: the structure matched but a precondition failed (or the rule failed)."""

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
    checked: str = ""  # the engine's local check: what it ran, or why it did not

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "removed": self.removed, "added": self.added, "why": self.why,
                "checked": self.checked}


class Rule(Protocol):
    id: str
    summary: str
    anchors: tuple[str, ...]  # op types the engine offers to `match`
    opt_in: bool  # only run when asked for (e.g. --remove-residuals)

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None: ...

    def check(self, graph: gs.Graph, match: Any) -> Any: ...  # a Plan, or a Refusal

    def rewrite(self, graph: gs.Graph, plan: Any) -> Replacement: ...


def conv_node(name: str, x: Input, out: gs.Tensor | NewValue, weight: np.ndarray,
              bias: np.ndarray | None, attrs: dict[str, Any], op: str = "Conv") -> NewNode:
    """A new Conv (or ConvTranspose) node reading `x`. kernel_shape is derived from the weight,
    never copied (a merged kernel is larger than the branch whose attributes it keeps)."""
    attrs = {k: v for k, v in attrs.items() if k != "kernel_shape"}
    attrs["kernel_shape"] = [int(k) for k in weight.shape[2:]]
    inputs: list[Input] = [x, NewWeight(f"{name}.weight", weight)]
    if bias is not None:
        inputs.append(NewWeight(f"{name}.bias", bias))
    return NewNode(op, name, inputs, [out], attrs)


def gemm_node(name: str, x: Input, out: gs.Tensor | NewValue, matrix: np.ndarray,
              bias: np.ndarray, attrs: dict[str, Any], dtype: Any) -> NewNode:
    """A new Gemm y = alpha * op(x) @ op(B) + C reading `x`, with B = `matrix` (in the layout
    the transB of `attrs` says) and C = `bias`, both cast to `dtype`. C is the whole bias, so
    beta is written as 1; alpha, transA and transB are kept from `attrs`."""
    weights = [NewWeight(f"{name}.{hint}", np.ascontiguousarray(np.asarray(v).astype(dtype)))
               for hint, v in (("B", matrix), ("C", bias))]
    return NewNode("Gemm", name, [x, *weights], [out], {**attrs, "beta": 1.0})
