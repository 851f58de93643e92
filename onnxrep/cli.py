"""Command line: thin click commands over the library.

Exit codes (scripts and CI pipelines rely on them; docs/DESIGN.md, "The CLI contract"):
0 written and verified; 1 verification failed, nothing written (unless --force); 2 bad input
or usage; 3 an internal error that left no output. 2 and 3 print one line on stderr, no
traceback (--debug shows it), and write no output file.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from onnxrep import api, io
from onnxrep.errors import InternalError, OnnxrepError, first_line
from onnxrep.targets import TARGETS
from onnxrep.verify import DEFAULT_ATOL, DEFAULT_RTOL, TOLERANCES, parse_input_shapes


def _ids(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _one_line_errors(func: Callable[..., int]) -> Callable[..., None]:
    """Turn any failure into one line on stderr: exit 2 for bad input, 3 for an internal error
    (--debug: the traceback too)."""

    @wraps(func)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        try:
            code = func(*args, **kwargs)
        except OnnxrepError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"onnxrep: error: {exc}", err=True)
            sys.exit(2)
        except InternalError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"onnxrep: internal error: {exc} (rerun with --debug and report it)",
                       err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("onnxrep: interrupted", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - the contract: never a traceback
            if debug:
                traceback.print_exc()
            click.echo(f"onnxrep: internal error: {type(exc).__name__}: {first_line(exc)} "
                       "(rerun with --debug and report it)", err=True)
            sys.exit(3)
        sys.exit(code)

    return wrapper


debug_option = click.option("--debug", is_flag=True, help="Show tracebacks.")
verify_options = [
    click.option("--rtol", type=float, default=None,
                 help=f"Max relative L2 error per output [default: {DEFAULT_RTOL:g}; float16 "
                      f"{TOLERANCES['float16'][0]:g}, bfloat16 {TOLERANCES['bfloat16'][0]:g}]."),
    click.option("--atol", type=float, default=None,
                 help=f"Max absolute error per output, for outputs near zero [default: "
                      f"{DEFAULT_ATOL:g}; float16 {TOLERANCES['float16'][1]:g}, bfloat16 "
                      f"{TOLERANCES['bfloat16'][1]:g}]."),
    click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D1,D2,...",
                 help="Values of symbolic dims for verification (default: sizes the input "
                      "model runs at, found automatically and named in the report)."),
]


def _with(options: list) -> Callable:
    def deco(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f
    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(api.__version__, prog_name="onnxrep")
def main() -> None:
    """Re-parameterize training-time multi-branch ONNX models into plain networks."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the JSON report here.")
@click.option("--remove-residuals", is_flag=True,
              help="Also remove residual Adds (RMNet; widens layers, opt-in).")
@click.option("--rules", "only", metavar="IDS", help="Comma-separated rule ids to run (only).")
@click.option("--skip", metavar="IDS", help="Comma-separated rule ids to skip.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@_with(verify_options)
@click.option("--explain", is_flag=True, help="Print near misses: why rules did not fire.")
@click.option("--max-growth", type=click.FloatRange(min=1.0), default=api.DEFAULT_MAX_GROWTH,
              show_default=True,
              help="Refuse a rewrite that would take the weights past this many times their "
                   "bytes in the input (a BN folded into consumers that share a weight copies "
                   "it); --remove-residuals is not bounded.")
@click.option("--target", metavar="T", default=None,
              help="Fit the output to a deployment runtime (opset, one file, op check): "
                   f"{', '.join(TARGETS)}.")
@click.option("--opset", type=int, default=None,
              help="Write this ai.onnx opset (13-18; default: the target's, else the input's).")
@click.option("--force", is_flag=True,
              help="Overwrite the input file; write even when verification fails.")
@click.option("-q", "--quiet", is_flag=True, help="No console report.")
@click.option("--check-runtime", "check_runtimes", multiple=True, metavar="R",
              help="Then convert and run the written model on runtime R against onnxruntime "
                   "(as `onnxrep check`; exit 1 when it disagrees).")
@debug_option
@_one_line_errors
def fuse(src: Path, dst: Path, report_path: Path | None, remove_residuals: bool,
         only: str | None, skip: str | None, no_verify: bool, rtol: float | None,
         atol: float | None,
         input_shape: tuple[str, ...], explain: bool, max_growth: float,
         target: str | None, opset: int | None,
         force: bool, quiet: bool, check_runtimes: tuple[str, ...]) -> int:
    """Fuse SRC into an equivalent plain model written to DST."""
    shapes = parse_input_shapes(input_shape)
    if check_runtimes:
        from onnxrep import runtimes

        for name in check_runtimes:  # a missing runtime package: say so before the work
            runtimes.require(name)
    # the cheap checks now, before the work; all of them again once the input's files are known
    io.check_writes([src] if src.exists() else [], dst, False, report_path, force)
    result = api.fuse(src, rules=_ids(only), skip=_ids(skip) or (),
                      remove_residuals=remove_residuals, verify=not no_verify,
                      rtol=rtol, atol=atol, input_shapes=shapes, target=target, opset=opset,
                      max_growth=max_growth)
    report = result.report
    failed = report.verification is not None and not report.verification.passed
    if not failed or force:
        api.write(result, dst, source=src, force=force, report=report_path)
    else:
        io.check_writes(result.source_files, dst, result.writes_external_data, report_path,
                        force)
    if report_path is not None:
        report_path.write_text(report.to_json())
    if not quiet:
        click.echo(report.render(explain=explain))
    if failed:
        click.echo("onnxrep: verification failed: "
                   + ("written anyway (--force)" if force else "nothing written"), err=True)
        return 1
    # at the shapes verification ran at (symbolic dims it picked included)
    verified = report.verification.input_shapes if report.verification else shapes
    return _check_runtimes(dst, check_runtimes, verified)


def _check_runtimes(model: Path, names: tuple[str, ...], shapes: dict[str, list[int]]) -> int:
    """Run `model` on each runtime against onnxruntime; 0 when all agree, else 1."""
    from onnxrep import runtimes

    checks = [runtimes.check(model, name, shapes) for name in names]
    for result in checks:
        click.echo(result.render())
    return 0 if all(c.passed for c in checks) else 1


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--runtime", "names", multiple=True, required=True, metavar="R",
              help="onnxruntime, ort-mobile, openvino, mnn, ncnn, tensorrt or tflite "
                   "(repeatable).")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D1,D2,...",
              help="Values of symbolic dims (default 1).")
@debug_option
@_one_line_errors
def check(model: Path, names: tuple[str, ...], input_shape: tuple[str, ...]) -> int:
    """Convert MODEL with runtime R's own tools, run it there and compare each output with
    onnxruntime on the same seeded inputs (exit 0 within R's tolerance, 1 not; 2 when R's
    package is missing)."""
    from onnxrep import runtimes

    shapes = parse_input_shapes(input_shape)
    for name in names:
        runtimes.require(name)
    io.load(model)  # one-line errors for bad files before any runtime sees them
    return _check_runtimes(model, names, shapes)


@main.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@_with(verify_options)
@debug_option
@_one_line_errors
def verify(reference: Path, candidate: Path, rtol: float | None, atol: float | None,
           input_shape: tuple[str, ...]) -> int:
    """Compare two models on the same random inputs (exit 0 equal, 1 different)."""
    from onnxrep.verify import verify as run_verification

    shapes = parse_input_shapes(input_shape)
    for path in (reference, candidate):
        io.load(path)  # one-line errors for bad files before onnxruntime sees them
    result = run_verification(reference, candidate, input_shapes=shapes, rtol=rtol, atol=atol)
    for o in result.outputs:
        click.echo(f"{o.name}: max|err| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}  "
                   f"{'ok' if o.passed else 'FAIL'}")
    if result.automatic:
        click.echo(f"symbolic dims {', '.join(f'{k}={n}' for k, n in result.automatic.items())}"
                   f" {result.shape_search}")
    click.echo("equivalent" if result.passed else "DIFFERENT")
    return 0 if result.passed else 1


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("fused", type=click.Path(path_type=Path), required=False)
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, multiple=True,
              help="Thread counts (default: 1 and all cores).")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D1,D2,...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@debug_option
@_one_line_errors
def bench(src: Path, fused: Path | None, runs: int, warmup: int, threads: tuple[int, ...],
          input_shape: tuple[str, ...], as_json: bool) -> int:
    """Latency of SRC against FUSED (fused in memory from SRC when not given)."""
    import json

    from onnxrep.bench import compare_latency, render, thread_counts
    from onnxrep.verify import admissible_shapes

    io.load(src)
    # sizes a dynamic model runs at, when not given (the report of `fuse` names them too)
    shapes = admissible_shapes(src, parse_input_shapes(input_shape))
    if fused is not None:
        io.load(fused)
        candidate = fused
    else:
        candidate = api.fuse(src, input_shapes=shapes).fused
    timings = [compare_latency(src, candidate, threads=t, runs=runs, warmup=warmup,
                               input_shapes=shapes) for t in (threads or thread_counts())]
    if as_json:
        click.echo(json.dumps({"source": str(src), "fused": str(fused or "<in memory>"),
                               "timings": [t.as_dict() for t in timings]}, indent=2))
    else:
        click.echo(render("input", "fused", timings))
    return 0


@main.command()
@debug_option
@_one_line_errors
def rules() -> int:
    """List the rules in the order they run."""
    from onnxrep.rules import RULES, TARGET_RULES

    for_target = [(rule, target) for target, rules in TARGET_RULES.items() for rule in rules]
    width = max(len(r.id) for r in [*RULES, *(r for r, _ in for_target)])
    for rule in RULES:
        tag = "  (opt-in: --remove-residuals)" if getattr(rule, "opt_in", False) else ""
        click.echo(f"{rule.id:<{width}}  {rule.summary}{tag}")
    for rule, target in for_target:
        click.echo(f"{rule.id:<{width}}  {rule.summary}  (--target {target} only)")
    return 0


if __name__ == "__main__":
    main()
