"""Inference latency of a model against its fused form, as deployed: onnxruntime CPU with its
graph optimizations ON, warm-up, then alternating runs (A B A B ...) so that both models see the
same machine state; medians and the interquartile range, for 1 thread and for all threads."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

from onnxrep.verify import ModelRef, random_inputs, session


@dataclass
class Timing:
    threads: int
    median_ms_a: float
    median_ms_b: float
    iqr_ms_a: float
    iqr_ms_b: float

    @property
    def ratio(self) -> float:
        return self.median_ms_b / self.median_ms_a if self.median_ms_a else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio_b_over_a": self.ratio}


def _iqr(values: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def compare_latency(a: ModelRef, b: ModelRef, threads: int = 1, runs: int = 50,
                    warmup: int = 5, input_shapes: dict[str, list[int]] | None = None,
                    seed: int = 0, min_seconds: float = 0.0, max_runs: int = 20000) -> Timing:
    """Median latency (ms) of `a` and `b` on the same inputs, runs alternating: `runs` pairs,
    and more until each model has run `min_seconds` in all (at most `max_runs` pairs), so
    that a model of a few microseconds gets enough runs for its median to mean something."""
    sess_a = session(a, threads=threads, optimize=True, spin=True)
    sess_b = session(b, threads=threads, optimize=True, spin=True)
    feeds = random_inputs(sess_a, input_shapes, seed)
    for _ in range(warmup):
        sess_a.run(None, feeds)
        sess_b.run(None, feeds)
    times_a, times_b = [], []
    while len(times_a) < max(runs, 4) or (
            len(times_a) < max_runs and min(sum(times_a), sum(times_b)) < min_seconds * 1e3):
        start = time.perf_counter()
        sess_a.run(None, feeds)
        times_a.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        sess_b.run(None, feeds)
        times_b.append((time.perf_counter() - start) * 1e3)
    return Timing(threads, statistics.median(times_a), statistics.median(times_b),
                  _iqr(times_a), _iqr(times_b))


def thread_counts() -> list[int]:
    cores = os.cpu_count() or 1
    return [1] if cores == 1 else [1, cores]


def render(name_a: str, name_b: str, timings: list[Timing]) -> str:
    lines = [f"{'threads':>7}  {name_a + ' ms':>14}  {name_b + ' ms':>14}  {'ratio':>6}"]
    for t in timings:
        lines.append(f"{t.threads:>7}  {t.median_ms_a:>8.3f} ±{t.iqr_ms_a:<5.3f}"
                     f"  {t.median_ms_b:>8.3f} ±{t.iqr_ms_b:<5.3f}  {t.ratio:>6.2f}")
    lines.append("(medians of alternating runs, ± interquartile range; onnxruntime CPU, "
                 "graph optimizations on)")
    return "\n".join(lines)


__all__ = ["Timing", "compare_latency", "render", "thread_counts"]
