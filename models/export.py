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
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

FORMS: tuple[str, ...] = ("ts-folded", "ts-unfolded", "dynamo", "dynamo-noopt")
OPSET = 18

_NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter warnings, log records and progress prints (stdout and stderr)."""
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
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


def export(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike,
    form: str,
) -> Path:
    """Export ``model`` (put in eval mode) for an input of ``input_shape`` to ``path``.

    Returns the path of the written .onnx file (dynamo forms also write ``<path>.data``).
    """
    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; expected one of {FORMS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(path)
    model = model.eval()
    x = torch.randn(*input_shape)
    common = dict(opset_version=OPSET, input_names=["input"], output_names=["output"])
    with quiet(), torch.no_grad():
        if form.startswith("ts-"):
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                do_constant_folding=(form == "ts-folded"),
                **common,
            )
        else:
            optimize = form == "dynamo"
            try:
                prog = torch.onnx.export(
                    model,
                    (x,),
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim("N")},),
                    optimize=optimize,
                    **common,
                )
            except Exception:  # fall back to a static batch
                prog = None
            if prog is not None:
                prog.save(str(path), external_data=True)
            if prog is None or not _batch_is_dynamic(path):
                _remove(path)
                prog = torch.onnx.export(
                    model, (x,), dynamo=True, optimize=optimize, **common
                )
                prog.save(str(path), external_data=True)
    return path


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
            if form not in fam.forms:
                print(f"skip {name}/{form}: {fam.note or 'form not supported'}", file=sys.stderr)
                continue
            out = args.out / f"{name}-{form}.onnx"
            try:
                export(fam.build_train(), fam.input_shape, out, form)
            except Exception as e:  # report and continue
                print(f"FAILED {name}/{form}: {type(e).__name__}: {e}", file=sys.stderr)
                status = 1
                continue
            print(out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
