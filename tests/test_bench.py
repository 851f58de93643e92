"""`onnxrep bench`: the output's structure (never its timings)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import cli

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "examples" / "repvgg_tiny.onnx"


def test_bench_fuses_in_memory_and_prints_json() -> None:
    proc = cli("bench", EXAMPLE, "--runs", "4", "--warmup", "1", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (timing,) = data["timings"]
    assert timing["threads"] == 1
    assert timing["median_ms_a"] > 0 and timing["median_ms_b"] > 0
    assert timing["ratio_b_over_a"] > 0


def test_bench_table_against_a_given_model(tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    assert cli("fuse", EXAMPLE, out, "-q").returncode == 0
    proc = cli("bench", EXAMPLE, out, "--runs", "4", "--warmup", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout and "medians" in proc.stdout


def test_bench_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = cli("bench", tmp_path / "missing.onnx")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
