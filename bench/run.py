"""The project benchmark (`make bench`): fused latency against the training form and the plain
(deploy) reference for every models/ family, and onnxrep's conversion cost against onnx
load+save and onnxslim on RepVGG networks of three sizes. Prints markdown, writes
bench/results.md and the README section between the bench markers."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

import onnxrep  # noqa: E402
from models.export import export  # noqa: E402
from models.registry import FAMILIES  # noqa: E402
from models.repvgg import repvgg_a0, repvgg_b3, repvgg_net  # noqa: E402
from onnxrep.bench import compare_latency  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "40"))
# and on until each model has run this long (a 30-microsecond model: thousands of runs)
MIN_SECONDS = float(os.environ.get("BENCH_MIN_SECONDS", "0.5"))
RM_FAMILIES = {"resnet18", "resnet50", "mobilenetv2", "preact_resnet"}  # fused with RM


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}, "
            f"onnx {onnx.__version__}, torch {torch.__version__}, onnxrep {onnxrep.__version__}; "
            f"{datetime.date.today().isoformat()}")


def latency_rows(tmp: Path) -> list[str]:
    rows = ["| model | input | train ms | fused ms | plain ms | fused/train | fused/plain "
            "| fused vs input |", "|---|---|---|---|---|---|---|---|"]
    cases = [(name, fam.build_train, fam.build_plain, fam.input_shape,
              "ts-unfolded" if "ts-unfolded" in fam.forms else fam.forms[0])
             for name, fam in FAMILIES.items()]
    cases.append(("RepVGG-A0", repvgg_a0, lambda: repvgg_a0(deploy=True), (1, 3, 224, 224),
                  "ts-unfolded"))
    only = os.environ.get("BENCH_FAMILIES")  # e.g. "resnet18,mobileone_se": those rows only
    if only:
        cases = [c for c in cases if c[0] in only.split(",")]
    for name, train, plain, shape, form in cases:
        src, ref = tmp / f"{name}.onnx", tmp / f"{name}-plain.onnx"
        export(train(), shape, src, form)
        export(plain(), shape, ref, form)
        fused = onnxrep.fuse(src, verify=False, remove_residuals=name in RM_FAMILIES).fused
        vs_train = compare_latency(src, fused, threads=1, runs=RUNS, min_seconds=MIN_SECONDS)
        vs_plain = compare_latency(ref, fused, threads=1, runs=RUNS, min_seconds=MIN_SECONDS)
        # never slower than the input: the plain export itself through onnxrep (nothing to
        # re-parameterize, only normalization and canonical ops) against that same export
        plain_fused = onnxrep.fuse(ref, verify=False, remove_residuals=name in RM_FAMILIES).fused
        vs_input = compare_latency(ref, plain_fused, threads=1, runs=RUNS,
                                   min_seconds=MIN_SECONDS)
        rows.append(f"| {name} | {'x'.join(map(str, shape[1:]))} | {vs_train.median_ms_a:.3f} | "
                    f"{vs_train.median_ms_b:.3f} | {vs_plain.median_ms_a:.3f} | "
                    f"{vs_train.ratio:.2f} | {vs_plain.ratio:.2f} | {vs_input.ratio:.2f} |")
        print(rows[-1], flush=True)
    return rows


REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def measure_once(mode: str, src: Path, tmp: Path) -> dict:
    dst = tmp / f"out-{mode}.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "measure.py"), mode, str(src),
                           str(dst)], capture_output=True, text=True, check=False)
    for leftover in tmp.glob("out-*"):
        leftover.unlink()
    if proc.returncode != 0:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(modes: tuple[str, ...], src: Path, tmp: Path) -> dict[str, dict]:
    """Median wall time and median peak RSS of REPEATS fresh processes per mode, the modes
    taking turns so that a slow spell of the machine (or its disk) hits them all alike."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(REPEATS):
        for mode in modes:
            runs[mode].append(measure_once(mode, src, tmp))
    result = {}
    for mode, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        result[mode] = ({"mode": mode, "seconds": statistics.median(r["seconds"] for r in ok),
                         "peak_mb": statistics.median(r["peak_mb"] for r in ok)}
                        if ok else rs[0])
    return result


def conversion_rows(tmp: Path) -> list[str]:
    rows = ["| model | params | file | load+save s / MB | fuse --no-verify s / MB | "
            "fuse s / MB | onnxslim s / MB | no-verify vs load+save (time, memory) |",
            "|---|---|---|---|---|---|---|---|"]
    sizes = [("RepVGG-A0", repvgg_a0),
             ("RepVGG-B3/2 depth", lambda: repvgg_net((64, 192, 384, 768, 2560), (1, 2, 3, 8, 1),
                                                      groups=4)),
             ("RepVGG-B3", repvgg_b3)]
    for name, build in sizes:
        model = build()
        params = sum(p.numel() for p in model.parameters())
        forms = [("single file", "ts-unfolded")]
        if name == "RepVGG-B3":
            forms.append(("external data", "dynamo-noopt"))
        for label, form in forms:
            src = tmp / f"{name.replace('/', '_')}-{form}.onnx"
            export(model, (1, 3, 224, 224), src, form)
            res = measure(("loadsave", "fuse-noverify", "fuse", "onnxslim"), src, tmp)

            def cell(r: dict) -> str:
                return r.get("error", f"{r.get('seconds', 0):.1f} / {r.get('peak_mb', 0):.0f}")

            base, ours = res["loadsave"], res["fuse-noverify"]
            ratio = (f"{ours['seconds'] / base['seconds']:.2f}x, "
                     f"{ours['peak_mb'] / base['peak_mb']:.2f}x"
                     if "error" not in base and "error" not in ours else "-")
            rows.append(f"| {name} | {params / 1e6:.1f}M | {label} | {cell(base)} | {cell(ours)} | "
                        f"{cell(res['fuse'])} | {cell(res['onnxslim'])} | {ratio} |")
            print(rows[-1], flush=True)
            for f in tmp.glob(src.name + "*"):
                f.unlink()
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        head = f"Measured on {machine()}."
        print(head)
        lat = latency_rows(tmp)
        if os.environ.get("BENCH_FAMILIES"):  # a partial run: print, write nothing
            return
        conv = conversion_rows(tmp)
    text = "\n".join([
        head, "",
        "**Inference latency** (onnxruntime CPU, graph optimizations on, 1 thread, medians of "
        f"alternating runs, at least {RUNS} and at least {MIN_SECONDS} s per model; "
        "train = TorchScript export with do_constant_folding=False, "
        "dynamo for OREPA; ResNets and MobileNetV2 fused with --remove-residuals, against "
        "their RMNet plain form; fused vs input = the plain export through onnxrep against "
        "that export, median ratio, <= 1.00 means never slower):",
        "", *lat, "",
        f"**Conversion cost** (a fresh process per run, medians of {REPEATS} runs taking turns; "
        "wall seconds / peak RSS MB; 224x224 input for verification):", "", *conv, ""])
    (ROOT / "bench" / "results.md").write_text(text + "\n")
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        after = rest.split(end, 1)[1]
        readme.write_text(f"{before}{start}\n{text}\n{end}{after}")


if __name__ == "__main__":
    main()
