"""`fuse(model) -> Result`: load -> normalize -> rules -> verify -> stamp. Writing is the
caller's (the CLI writes atomically, and only after verification passed)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import onnx

from onnxrep import engine, io, targets
from onnxrep import graph as graph_mod
from onnxrep.errors import OnnxrepError
from onnxrep.report import Report, macs, op_counts, parameter_count, stamp
from onnxrep.rule import Rule
from onnxrep.verify import verify as run_verification

__version__ = "0.1.0"
DEFAULT_MAX_GROWTH = 1.05


@dataclass
class Result:
    fused: io.SplitModel  # the structure, and the large weights as arrays beside it
    report: Report
    external_data: bool  # the input kept its weights in an external data file
    source_files: list[Path] = field(default_factory=list)  # the files the input was read from

    @property
    def writes_external_data(self) -> bool:
        """`write` puts the weights in an external data file (as the input had, or past 2 GB)."""
        return self.external_data or self.fused.nbytes >= io.TWO_GB

    @cached_property
    def model(self) -> onnx.ModelProto:
        """The fused model as one ModelProto (built on first use: a copy of every weight)."""
        return self.fused.materialize()

    @property
    def verified(self) -> bool:
        return self.report.verification is not None and self.report.verification.passed


def select_rules(
    only: Iterable[str] | None = None, skip: Iterable[str] = (), remove_residuals: bool = False
) -> list[Rule]:
    """The ordered rule list, restricted by ids. Opt-in rules (residual removal) run only when
    asked for, by `remove_residuals` or by naming them in `only`."""
    from onnxrep.rules import RULES

    known = {r.id for r in RULES}
    only = list(only) if only is not None else None
    skip = list(skip)
    unknown = sorted({*(only or []), *skip} - known)
    if unknown:
        raise OnnxrepError(f"unknown rule id(s): {', '.join(unknown)} (see 'onnxrep rules')")
    chosen = []
    for rule in RULES:
        if rule.id in skip:
            continue
        if only is not None and rule.id not in only:
            continue
        if getattr(rule, "opt_in", False) and not remove_residuals and only is None:
            continue
        chosen.append(rule)
    return chosen


def fuse(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    rules: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    remove_residuals: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    target: str | None = None,
    opset: int | None = None,
    max_growth: float | None = DEFAULT_MAX_GROWTH,
) -> Result:
    """Re-parameterize a model. `model` is a ModelProto or a path (external data is loaded
    from beside it). The returned report says what was applied and how the fused model
    compares with the input on onnxruntime; check `result.verified` before using it.
    `max_growth`: no rewrite (but residual removal, opt-in) may take the weights past this
    many times their bytes at the start (a map folded into consumers that share a weight
    copies it); None: no bound.
    `target` / `opset`: fit the output to a deployment runtime (onnxrep/targets.py), a step
    the verification covers; the model is then written as one file when it fits in 2 GB."""
    start = time.perf_counter()
    if isinstance(model, onnx.ModelProto):
        io.check(model)
        source, path, external, files = model, None, False, []
    else:
        loaded = io.load(model)
        source, path, external = loaded.model, loaded.path, loaded.external_data
        files = loaded.files
        del loaded
    chosen = select_rules(rules, skip, remove_residuals)
    fitting = target is not None or opset is not None
    if fitting:  # a bad target or opset is a one-line error before any work
        target = target or targets.DEFAULT_TARGET
        targets.target_opset(source, target, opset)
    report = Report(
        version=__version__,
        source=str(path) if path else "<model>",
        ops_before=op_counts(source),
        params_before=parameter_count(source),
    )
    macs_before = macs(source, input_shapes) if remove_residuals else None
    header = io.header_of(source)
    graph = graph_mod.normalize(source, base_dir=path.parent if path is not None else None)
    reference: onnx.ModelProto | Path = source
    if path is not None:
        # The file is the verification reference: the weights are now arrays of the graph's
        # own, so let the loaded proto go (for a 0.5 GB model, 0.5 GB less at the peak).
        reference = path
        del source
        gc.collect()  # gs's import leaves reference cycles that still point into the proto
    result = engine.run(graph, chosen, check_locally=verify, max_growth=max_growth)
    graph_mod.drop_identities(graph)
    if graph_mod.refresh_shapes(graph):
        # the rewrites (reshape-chain above all) let inference name dims it could not before:
        # the rules get one more look, so that fusing the output again applies nothing
        again = engine.run(graph, chosen, check_locally=verify, max_growth=max_growth)
        graph_mod.drop_identities(graph)
        result.applied += again.applied
        result.misses = again.misses
    if fitting:
        # the target's own layouts, once the plain rules are done (they would not read them)
        from onnxrep.rules import TARGET_RULES

        for_target = TARGET_RULES.get(target, [])
        if for_target:
            fitted = engine.run(graph, for_target, check_locally=verify)
            result.applied += fitted.applied
            result.misses += fitted.misses
    report.extra["weight_bytes"] = {"before": result.weight_bytes_before,
                                    "after": engine.weight_bytes(graph),
                                    "max_growth": max_growth}
    fused = graph_mod.export(graph, like=header)
    del graph
    if fitting:
        fused.proto, warnings = targets.fit_to_target(fused.proto, target, opset)
        report.target = {"name": target, "opset": targets.opset_mod.model_opset(fused.proto),
                         "warnings": warnings}
        external = False  # one file when the weights fit (Result.writes_external_data)
    report.applied, report.misses = result.applied, result.misses
    report.ops_after = op_counts(fused.proto)
    report.params_after = parameter_count(fused.proto)
    if remove_residuals:  # RM widens convs: show what it costs
        after = macs(fused.proto, input_shapes)
        if macs_before is not None and after is not None:
            report.extra["macs"] = {"before": macs_before, "after": after}
    if verify:
        report.verification = run_verification(
            reference, fused, input_shapes=input_shapes, rtol=rtol, atol=atol
        )
    report.seconds = time.perf_counter() - start
    stamp(fused.proto, report)
    return Result(fused=fused, report=report, external_data=external, source_files=files)


def write(result: Result, destination: str | os.PathLike[str], source: Path | None = None,
          force: bool = False, report: Path | None = None) -> list[Path]:
    """Atomically write a fused model (external data when the input had it or past 2 GB).
    Nothing is written when any destination (the model, its data file, `report` if given)
    would overwrite a file the input reads or one another (io.check_writes)."""
    dst = Path(destination)
    sources = result.source_files or ([source] if source is not None else [])
    io.check_writes(sources, dst, result.writes_external_data, report, force)
    result.report.destination = str(dst)
    return io.save_atomic(result.fused, dst, external_data=result.writes_external_data)
