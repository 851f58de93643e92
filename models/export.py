"""Export a model to ONNX in one of the four forms real pipelines produce.

Forms:
  ts-folded     TorchScript exporter (dynamo=False), constant folding on (Conv-BN folded).
  ts-unfolded   TorchScript exporter with do_constant_folding=False (every BN kept).
  dynamo        torch.export-based exporter, weights in ``<path>.data``, onnxscript optimizer on.
  dynamo-noopt  as dynamo with optimize=False.

All forms use opset 18, input name ``input``, output name ``output`` and a dynamic batch
dimension ``N`` (dynamo falls back to a static batch when a model can't export with one).

CLI: ``python -m models.export --family NAME|all --form FORM|all --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch

FORMS: tuple[str, ...] = ("ts-folded", "ts-unfolded", "dynamo", "dynamo-noopt")
OPSET = 18

_NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter warnings, log records and progress prints (stdout and stderr).

    torch's loggers hold the original stderr, so records are disabled, not redirected (the
    dynamo exporter logs guard failures at ERROR level even when it recovers).
    """
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    saved_disable = logging.root.manager.disable
    try:
        logging.disable(logging.CRITICAL)
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(saved_disable)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _batch_is_dynamic(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    for vi in (m.graph.input[0], m.graph.output[0]):
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def batch_is_dynamic(path: str | os.PathLike) -> bool:
    """True when both the graph input and output have a symbolic first (batch) dimension."""
    return _batch_is_dynamic(Path(path))


def _remove(path: Path) -> None:
    for p in (path, Path(str(path) + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _dynamo_program(
    model: torch.nn.Module, input_shape: tuple[int, ...], probe: Path
) -> tuple[Any, bool]:
    """Run the dynamo exporter (optimize=False) with a dynamic batch; fall back to a static
    batch when that fails or the batch does not survive. Returns (ONNXProgram, dynamic)."""
    common: dict[str, Any] = dict(
        opset_version=OPSET, input_names=["input"], output_names=["output"]
    )
    # torch.export specializes sizes 0 and 1: a batch-1 example can pin the batch (DBB's
    # broadcasting slice assignment does), so the dynamic attempt traces with a batch of 2.
    x2 = torch.randn(max(2, input_shape[0]), *input_shape[1:])
    try:
        prog = torch.onnx.export(
            model,
            (x2,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("N")},),
            optimize=False,
            **common,
        )
        prog.save(str(probe), external_data=True)
        dynamic = _batch_is_dynamic(probe)
    except Exception:  # fall back to a static batch below
        prog, dynamic = None, False
    finally:
        _remove(probe)
    if prog is None or not dynamic:
        x = torch.randn(*input_shape)
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False, **common)
    return prog, dynamic


def export_forms(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    paths: Mapping[str, str | os.PathLike],
) -> dict[str, Path]:
    """Export ``model`` once per form in ``paths`` (form -> .onnx path); returns form -> Path.

    The two dynamo forms share one torch.export + translation: ``optimize=True`` of
    ``torch.onnx.export`` is exactly ``ONNXProgram.optimize()`` applied afterwards.
    """
    bad = set(paths) - set(FORMS)
    if bad:
        raise ValueError(f"unknown export form(s) {sorted(bad)}; expected some of {FORMS}")
    out = {form: Path(p) for form, p in paths.items()}
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove(p)
    model = model.eval()
    x = torch.randn(*input_shape)
    with quiet(), torch.no_grad():
        for form in ("ts-folded", "ts-unfolded"):
            if form in out:
                torch.onnx.export(
                    model,
                    (x,),
                    str(out[form]),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                    do_constant_folding=(form == "ts-folded"),
                )
        if "dynamo" in out or "dynamo-noopt" in out:
            probe = next(p for f, p in out.items() if f.startswith("dynamo"))
            probe = probe.with_name(probe.name + ".probe.onnx")
            prog, _ = _dynamo_program(model, input_shape, probe)
            if "dynamo-noopt" in out:
                prog.save(str(out["dynamo-noopt"]), external_data=True)
            if "dynamo" in out:
                prog.optimize()
                prog.save(str(out["dynamo"]), external_data=True)
    return out


def export(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike,
    form: str,
) -> Path:
    """Export ``model`` (put in eval mode) for an input of ``input_shape`` to ``path``.

    Returns the path of the written .onnx file (dynamo forms also write ``<path>.data``).
    The batch dimension is dynamic (``N``) unless the dynamo exporter could not keep it
    (check with :func:`batch_is_dynamic`).
    """
    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; expected one of {FORMS}")
    return export_forms(model, input_shape, {form: path})[form]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from models.registry import FAMILIES

    ap = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="all", help=f"one of {sorted(FAMILIES)} or 'all'")
    ap.add_argument("--form", default="all", help=f"one of {FORMS} or 'all'")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    families = sorted(FAMILIES) if args.family == "all" else [args.family]
    status = 0
    for name in families:
        if name not in FAMILIES:
            print(f"unknown family {name!r}", file=sys.stderr)
            return 2
        fam = FAMILIES[name]
        forms = fam.forms if args.form == "all" else (args.form,)
        for form in forms:
            if form not in FORMS:
                print(f"unknown form {form!r}; expected one of {FORMS}", file=sys.stderr)
                return 2
            if form not in fam.forms:
                print(f"skip {name}/{form}: {fam.note or 'form not supported'}", file=sys.stderr)
        paths = {f: args.out / f"{name}-{f}.onnx" for f in forms if f in fam.forms}
        if not paths:
            continue
        model = fam.build_train()
        try:
            written = export_forms(model, fam.input_shape, paths)
        except Exception:  # retry form by form to report exactly which one fails
            written = {}
            for form, path in paths.items():
                try:
                    written[form] = export(model, fam.input_shape, path, form)
                except Exception as e:
                    print(f"FAILED {name}/{form}: {type(e).__name__}: {e}", file=sys.stderr)
                    status = 1
        for p in written.values():
            print(p if batch_is_dynamic(p) else f"{p}  (static batch)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
