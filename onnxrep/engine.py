"""The rule loop, and the only code that changes the graph on a rule's behalf.

Each iteration offers every node of the graph to every rule in order:
match -> check -> rewrite -> validate -> apply, at once (matches overlap, so they are never
collected and applied later). The loop stops when an iteration changes nothing; a cap on
iterations turns a pair of rules that keep undoing each other into an error that names them.
Near misses still standing at the fixed point are kept for `--explain` (docs/DESIGN.md,
"The engine loop").

Transactional: a rule only describes a Replacement. An exception inside match, check or
rewrite becomes a refusal ("internal error in rule R at node N: ...") and that (rule, node)
is skipped for the rest of the run; a Replacement that does not fit the graph (a tensor it
reads is gone, an inner tensor escapes) is refused the same way. Only then does `apply` touch
the graph, and it does nothing that can fail on a validated replacement.

Refusals are cached per (rule, anchor node) together with the tensors around the match; a
rewrite that adds or removes a producer or a reader of one of those tensors drops the entry,
so an expensive check (merge-sequential's probe of a border fill) runs again only when its
neighbourhood changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import gs_bridge, local_check
from onnxrep.errors import RulesDidNotConverge, first_line
from onnxrep.query import is_graph_output
from onnxrep.rule import (
    Applied,
    Match,
    Miss,
    NewValue,
    NewWeight,
    Refusal,
    Replacement,
    Rule,
)
from onnxrep.surgery import detach_output, fresh_namer

MAX_ITERATIONS = 64


@dataclass
class EngineResult:
    applied: list[Applied] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    iterations: int = 0
    weight_bytes_before: int = 0


class InvalidReplacement(Exception):
    """A replacement that does not fit the graph: refused, never applied."""


def _tensors_of(nodes: Sequence[gs.Node]) -> set[int]:
    return {id(t) for n in nodes for t in (*n.inputs, *n.outputs) if t is not None}


def validate(graph: gs.Graph, replacement: Replacement) -> None:
    """Raise InvalidReplacement unless applying `replacement` gives a well-formed graph that
    computes every surviving tensor as before (the replaced ones by the new nodes)."""
    alive = {id(n) for n in graph.nodes}
    removed = {id(n) for n in replacement.removes}
    if len(removed) != len(replacement.removes):
        raise InvalidReplacement("a node is removed twice")
    for node in replacement.removes:
        if id(node) not in alive:
            raise InvalidReplacement(f"{node.name} is not in the graph")
    taken_over: dict[int, gs.Tensor] = {}
    made: set[int] = set()
    for new in replacement.nodes:
        for t in new.inputs:
            if isinstance(t, NewValue):
                if id(t) not in made:
                    raise InvalidReplacement(f"{new.name} reads {t.hint} before it is computed")
            elif isinstance(t, NewWeight):
                if not isinstance(t.values, np.ndarray):
                    raise InvalidReplacement(f"weight {t.hint} is not an array")
            elif isinstance(t, gs.Tensor):
                if id(t) in taken_over:
                    continue
                if t.name and not isinstance(t, gs.Constant) and not t.inputs and not any(
                        t is i for i in graph.inputs):
                    raise InvalidReplacement(f"{new.name} reads {t.name}, which nothing computes")
                if any(id(p) in removed for p in t.inputs):
                    raise InvalidReplacement(f"{new.name} reads {t.name}, which a removed node "
                                             "computes and no new node does (yet)")
            else:
                raise InvalidReplacement(f"{new.name} reads {t!r}")
        for t in new.outputs:
            if isinstance(t, NewValue):
                if id(t) in made:
                    raise InvalidReplacement(f"{t.hint} is computed twice")
                made.add(id(t))
            elif isinstance(t, gs.Variable):
                if id(t) in taken_over or not t.inputs or any(
                        id(p) not in removed for p in t.inputs):
                    raise InvalidReplacement(f"{new.name} would write {t.name}, which a node "
                                             "that stays computes")
                taken_over[id(t)] = t
            else:
                raise InvalidReplacement(f"{new.name} writes {t!r}")
    removed_nodes = replacement.removes
    for node in removed_nodes:
        for t in node.outputs:
            if id(t) in taken_over:
                continue
            if is_graph_output(graph, t):
                raise InvalidReplacement(f"{t.name} (inside the match) is a graph output")
            for reader in t.outputs:
                if id(reader) not in removed:
                    raise InvalidReplacement(f"{t.name} (inside the match) is also read by "
                                             f"{reader.name}")


def apply(graph: gs.Graph, replacement: Replacement,
          shapes: dict[int, list] | None = None) -> tuple[list[str], list[str]]:
    """Apply a validated replacement; returns (removed node names, added node names).
    Removed nodes give up their names first, so a new node can take the name of the node it
    stands for. `shapes` (id of a NewValue -> dims) are given to the new tensors."""
    shapes = shapes or {}
    removed_names = [n.name for n in replacement.removes]
    for node in replacement.removes:
        node.inputs.clear()
        node.outputs.clear()
        node.name = ""
    graph.nodes = [n for n in graph.nodes if n.name or n.inputs or n.outputs]
    node_name = fresh_namer({n.name for n in graph.nodes})
    tensor_name = fresh_namer(graph.tensors().keys())
    values: dict[int, gs.Tensor] = {}

    def resolve(t: object) -> gs.Tensor:
        if isinstance(t, NewValue):
            if id(t) not in values:
                values[id(t)] = gs.Variable(tensor_name(t.hint), dtype=t.dtype,
                                            shape=shapes.get(id(t)))
            return values[id(t)]
        if isinstance(t, NewWeight):
            return gs.Constant(tensor_name(t.hint), np.ascontiguousarray(t.values))
        return t  # a tensor of the graph

    added = []
    for new in replacement.nodes:
        outputs = [resolve(t) for t in new.outputs]
        for out in outputs:
            for old in list(out.inputs):
                detach_output(old, out)
        node = gs.Node(op=new.op, name=node_name(new.name), attrs=dict(new.attrs),
                       inputs=[resolve(t) for t in new.inputs], outputs=outputs)
        graph.nodes.append(node)
        added.append(node.name)
    return removed_names, added


def _newly_dead(graph: gs.Graph, was_read: list[gs.Tensor]) -> list[gs.Node]:
    """The nodes a rewrite left without a reader (cleanup will drop them), found by walking up
    from the tensors the removed nodes read: their tensors lose a reader too."""
    dead: dict[int, gs.Node] = {}
    todo = list(was_read)
    while todo:
        tensor = todo.pop()
        for node in tensor.inputs:
            if id(node) in dead or any(
                    any(id(r) not in dead for r in out.outputs) or is_graph_output(graph, out)
                    for out in node.outputs):
                continue
            dead[id(node)] = node
            todo.extend(t for t in node.inputs if t is not None)
    return list(dead.values())


def _weights_read_by(nodes: Sequence[gs.Node]) -> list[gs.Constant]:
    return [t for n in nodes for t in n.inputs if isinstance(t, gs.Constant)]


def _release_dead(graph: gs.Graph, weights: list[gs.Constant]) -> None:
    """Free the arrays of weights that a rewrite left without readers, now: a gs tensor sits
    in a reference cycle with its own input/output lists, so it would otherwise wait for
    Python's cycle collector, and a 0.5 GB model would hold old and new weights at once."""
    for tensor in weights:
        if not tensor.outputs and not is_graph_output(graph, tensor):
            gs_bridge.release_values(tensor)


@dataclass
class _Cached:
    node: gs.Node  # held, so that its id is not reused by a new node while the entry lives
    refusal: Refusal
    region: set[int]  # ids of the tensors around the match (held by the graph or `node`)


class _RefusalCache:
    """(rule id, anchor node) -> the refusal, until a rewrite touches its neighbourhood.
    A rule whose checks look further than its match's own tensors (a proof that walks the
    whole graph upstream) sets `cache_refusals = False`."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], _Cached] = {}

    def get(self, rule: str, node: gs.Node) -> Refusal | None:
        entry = self.entries.get((rule, id(node)))
        return None if entry is None or entry.node is not node else entry.refusal

    def put(self, rule: Rule, match: Match, refusal: Refusal) -> None:
        if getattr(rule, "cache_refusals", True):
            region = _tensors_of([match.anchor, *match.nodes])
            self.entries[(rule.id, id(match.anchor))] = _Cached(match.anchor, refusal, region)

    def touched(self, tensors: set[int]) -> None:
        """Drop every entry whose neighbourhood gained or lost a producer or a reader."""
        self.entries = {k: e for k, e in self.entries.items() if not (e.region & tensors)}


@dataclass
class _Refused:
    match: Match
    refusal: Refusal


@dataclass
class _Accepted:
    replacement: Replacement
    checked: str  # what the local check did, or why it did not run
    shapes: dict[int, list]  # the local check's inferred dims of the new values (id -> dims)


def _attempt(graph: gs.Graph, rule: Rule, node: gs.Node, check_locally: bool
             ) -> _Accepted | _Refused | None:
    """match -> check -> rewrite -> validate -> local check for one anchor node: the
    replacement to apply, a refusal, or None (no match). Exceptions propagate to `run`, which
    records them."""
    match = rule.match(graph, node)
    if match is None:
        return None
    plan = rule.check(graph, match)
    if isinstance(plan, Refusal):
        return _Refused(match, plan)
    replacement = rule.rewrite(graph, plan)
    try:
        validate(graph, replacement)
    except InvalidReplacement as exc:
        return _Refused(match, Refusal(str(exc)))
    if not check_locally:
        return _Accepted(replacement, "not checked: local checks off", {})
    local = local_check.check(graph, replacement)
    if not local.passed:
        return _Refused(match, Refusal(f"local check failed, rewrite not applied: "
                                       f"{local.detail} (a bug in rule {rule.id}: please "
                                       "report it)"))
    return _Accepted(replacement, local.detail, local.shapes)


def weight_bytes(graph: gs.Graph) -> int:
    """The bytes of the graph's constants, each counted once."""
    return sum(t.values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))


def _growth(graph: gs.Graph, replacement: Replacement, weights: list[gs.Constant]) -> int:
    """Bytes a replacement adds to the weights: its new constants, less those of `weights`
    (the constants its removed nodes read) that only the removed nodes read (a weight shared
    with a node that stays is kept for it)."""
    added = sum(t.values.nbytes for n in replacement.nodes for t in n.inputs
                if isinstance(t, NewWeight))
    removed = {id(n) for n in replacement.removes}
    freed = {id(t): t for t in weights
             if all(id(r) in removed for r in t.outputs) and not is_graph_output(graph, t)}
    return added - sum(t.values.nbytes for t in freed.values())


def run(
    graph: gs.Graph, rules: Sequence[Rule], max_iterations: int = MAX_ITERATIONS,
    check_locally: bool = False, max_growth: float | None = None,
) -> EngineResult:
    """Run `rules` to a fixed point. With `check_locally`, every rewrite is first compared
    with the block it replaces (onnxrep.local_check) and refused when they differ. With
    `max_growth`, a rewrite of a rule that copies weights (`copies_weights = True`: a map
    folded into consumers that share a weight, a producer's channels repeated) is refused when
    the bytes such rewrites add in all would pass `max_growth - 1` times the weights' bytes at
    the start (docs/DESIGN.md, "The engine loop"). The other rules merge weights (a merged
    kernel replaces its branches) or, residual removal, widen layers by design and only when
    asked for: what they add or free does not count."""
    result = EngineResult()
    result.weight_bytes_before = weight_bytes(graph)
    # bytes the weight-copying rules may add in all (net of what their own rewrites free):
    # the bound is on them alone - residual removal widens layers by design, merges shrink
    budget = None if max_growth is None else (max_growth - 1) * result.weight_bytes_before
    copied = 0
    cache = _RefusalCache()
    # (rule, node) pairs whose rule raised: skipped for the rest of the run (node held, so its
    # id is not reused)
    broken: dict[tuple[str, int], tuple[gs.Node, Miss]] = {}
    for iteration in range(1, max_iterations + 1):
        result.iterations = iteration
        fired: Counter[str] = Counter()
        misses: list[Miss] = []
        for rule in rules:
            alive = {id(n) for n in graph.nodes}
            for node in list(graph.nodes):
                if node.op not in rule.anchors or id(node) not in alive:
                    continue
                key = (rule.id, id(node))
                if key in broken and broken[key][0] is node:
                    misses.append(broken[key][1])
                    continue
                cached = cache.get(rule.id, node)
                if cached is not None:
                    misses.append(Miss(rule.id, node.name, cached.reason))
                    continue
                try:
                    outcome = _attempt(graph, rule, node, check_locally)
                except Exception as exc:  # noqa: BLE001 - a rule bug: refuse, go on
                    reason = (f"internal error in rule {rule.id} at node {node.name}: "
                              f"{type(exc).__name__}: {first_line(exc)}")
                    broken[key] = (node, Miss(rule.id, node.name, reason))
                    misses.append(broken[key][1])
                    continue
                if outcome is None:
                    continue
                if isinstance(outcome, _Refused):
                    cache.put(rule, outcome.match, outcome.refusal)
                    misses.append(Miss(rule.id, node.name, outcome.refusal.reason))
                    continue
                accepted = outcome.replacement
                weights = _weights_read_by(accepted.removes)
                growth = _growth(graph, accepted, weights)
                copies = getattr(rule, "copies_weights", False)
                if budget is not None and copies and growth > 0 and copied + growth > budget:
                    misses.append(Miss(rule.id, node.name, (
                        f"would copy {copied + growth:,} bytes of weights in all, past "
                        f"--max-growth {max_growth:g} x {result.weight_bytes_before:,}")))
                    continue
                copied += growth if copies else 0
                was_read = [t for n in accepted.removes for t in n.inputs if t is not None]
                touched = _tensors_of(accepted.removes) | {
                    id(t) for n in accepted.nodes for t in (*n.inputs, *n.outputs)
                    if isinstance(t, gs.Tensor)}
                removed, added = apply(graph, accepted, outcome.shapes)
                result.applied.append(Applied(rule.id, removed, added, accepted.why,
                                              outcome.checked))
                touched |= _tensors_of(_newly_dead(graph, was_read))
                touched |= _tensors_of(graph.nodes[-len(added):] if added else [])
                cache.touched(touched)
                # cleanup drops nodes left dead (a dead reader would look like a second
                # consumer to the next match); ordering waits for the end of the pass
                graph.cleanup()
                alive = {id(n) for n in graph.nodes}
                _release_dead(graph, weights)
                fired[rule.id] += 1
            if fired[rule.id]:
                graph.toposort()
        result.misses = misses
        if not fired:
            return result
    names = ", ".join(f"{r} ({n}x)" for r, n in fired.most_common())
    raise RulesDidNotConverge(
        f"rules still rewriting after {max_iterations} iterations: {names}; "
        "rerun with --skip for one of them and report the model"
    )


__all__ = ["EngineResult", "InvalidReplacement", "apply", "run", "validate", "weight_bytes"]
