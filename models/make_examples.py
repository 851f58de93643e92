"""Write the small bundled example models into ``models/examples/``.

``repvgg_tiny.onnx`` and ``mobileone_tiny.onnx``: the registry's training-time models,
TorchScript exporter with constant folding off (every BN kept), opset 18, dynamic batch ``N``,
one plain file (no external data), under 300 KB.

Usage: ``python -m models.make_examples [--out DIR]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from models.export import batch_is_dynamic, export
from models.registry import FAMILIES

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES: dict[str, str] = {"repvgg_tiny.onnx": "repvgg", "mobileone_tiny.onnx": "mobileone"}
MAX_BYTES = 300 * 1024


def make_examples(out_dir: Path = EXAMPLES_DIR) -> list[Path]:
    """Export every example to ``out_dir``; check size, dynamic batch and single-file-ness."""
    written = []
    for filename, family in EXAMPLES.items():
        fam = FAMILIES[family]
        path = export(fam.build_train(), fam.input_shape, out_dir / filename, "ts-unfolded")
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            raise RuntimeError(f"{path} uses external data")
        if not batch_is_dynamic(path):
            raise RuntimeError(f"{path}: batch dimension is not dynamic")
        size = path.stat().st_size
        if size >= MAX_BYTES:
            raise RuntimeError(f"{path} is {size} bytes (limit {MAX_BYTES})")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m models.make_examples")
    ap.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    args = ap.parse_args(argv)
    for p in make_examples(args.out):
        print(f"{p}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
