"""The deployment-runtime table (`make targets`): every models/ family in every export form,
fused (with `--target R` where onnxrep has it) and run on every installed runtime R against
onnxruntime; the training form and the plain form built directly in PyTorch (the registry's
build_plain, exported in the same form) run on R too, for the bar of issue 13: the fused
model's error on R no larger than the training form's, and no more layers in R than the
plain form. Writes bench/targets.md and the README section between the targets markers.

TARGETS_FAMILIES=a,b / TARGETS_FORMS=... / TARGETS_RUNTIMES=... restrict the run;
TARGETS_BUDGET=<seconds> stops starting new families after that long (the table says so);
TARGETS_OUT=<file.md> writes there instead, README untouched (a sample run, e.g. of tflite with
ONNXREP_TFLITE_PYTHON set: bench/targets-tflite.md).
Exit 1 when a checked case misses the bar.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import RM_FAMILIES, machine  # noqa: E402
from models.export import export  # noqa: E402
from models.registry import FAMILIES, Family  # noqa: E402
from onnxrep import runtimes  # noqa: E402
from onnxrep.runtimes import RuntimeCheck  # noqa: E402

START, END = "<!-- targets:start -->", "<!-- targets:end -->"
PACKAGES = ("openvino", "MNN", "ncnn", "pnnx", "tensorrt", "onnx2tf")


@dataclass
class Case:
    family: str
    form: str
    runtime: str
    fused: RuntimeCheck
    train: RuntimeCheck
    plain: RuntimeCheck

    @property
    def meets_bar(self) -> bool:
        """Runs within the runtime's tolerance, with an error no larger than the training
        form shows there (rounding noise below the tolerance counts as equal), and no more
        layers than the plain form."""
        if not self.fused.passed:
            return False
        tolerance = runtimes.RUNTIMES[self.runtime].rtol
        if self.train.ran and self.fused.worst_rel_l2 > max(self.train.worst_rel_l2, tolerance):
            return False
        return not (self.fused.layers is not None and self.plain.layers is not None
                    and self.fused.layers > self.plain.layers)


def has_target_option() -> bool:
    """Whether this onnxrep's fuse has `--target` (onnxrep/targets.py, issue 13 item 3)."""
    proc = subprocess.run([sys.executable, "-m", "onnxrep.cli", "fuse", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return "--target" in proc.stdout


def fuse(src: Path, dst: Path, family: str, target: str | None) -> str:
    """Fuse through the CLI; '' or the one-line error."""
    cmd = [sys.executable, "-m", "onnxrep.cli", "fuse", str(src), str(dst), "-q"]
    if family in RM_FAMILIES:
        cmd.append("--remove-residuals")
    if target is not None:
        cmd += ["--target", target]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def not_fused(runtime: str, error: str) -> RuntimeCheck:
    return RuntimeCheck(runtime, False, False, error=f"onnxrep fuse failed: {error}")


def run_family(family: Family, forms: list[str], names: list[str], with_target: bool,
               tmp: Path) -> list[Case]:
    cases = []
    shapes = {"input": list(family.input_shape)}
    for form in forms:
        src, plain = tmp / f"{family.name}-{form}.onnx", tmp / f"{family.name}-{form}-plain.onnx"
        export(family.build_train(), family.input_shape, src, form)
        export(family.build_plain(), family.input_shape, plain, form)
        shared = tmp / f"{family.name}-{form}-fused.onnx"
        shared_error = None if with_target else fuse(src, shared, family.name, None)
        for name in names:
            if with_target:
                fused = tmp / f"{family.name}-{form}-{name}.onnx"
                error = fuse(src, fused, family.name, name)
            else:
                fused, error = shared, shared_error or ""
            models = [src, plain] if error else [fused, src, plain]
            checks = runtimes.check_many(models, name, shapes)  # one child process for all
            if error:
                checks.insert(0, not_fused(name, error))
            case = Case(family.name, form, name, *checks)
            print(row(case), flush=True)
            cases.append(case)
        for leftover in tmp.glob(f"{family.name}-{form}*"):
            leftover.unlink()
    return cases


def _err(check: RuntimeCheck) -> str:
    return f"{check.worst_rel_l2:.1e}" if check.ran else "-"


def _layers(check: RuntimeCheck) -> str:
    return "-" if check.layers is None or not check.ran else str(check.layers)


def _status(check: RuntimeCheck) -> str:
    if check.ran:
        return "yes" if check.passed else "runs, differs"
    return "no convert" if not check.converted else "converts, no run"


def row(case: Case) -> str:
    f, t = case.fused, case.train
    return (f"| {case.family} | {case.form} | {case.runtime} | {'yes' if f.converted else 'no'} "
            f"| {'yes' if f.ran else 'no'} | {_err(f)} | {_err(t) if t.ran else _status(t)} | "
            f"{_layers(f)} / {_layers(case.plain)} / {_layers(t)} | "
            f"{'ok' if case.meets_bar else 'MISS'} |")


def matrix(cases: list[Case], names: list[str]) -> list[str]:
    """family x form rows, one column per runtime: rel L2 error and layers fused/plain."""
    head = ["| family | form | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names)]
    by_key: dict[tuple[str, str], dict[str, Case]] = {}
    for case in cases:
        by_key.setdefault((case.family, case.form), {})[case.runtime] = case
    lines = []
    for (family, form), row_cases in by_key.items():
        cells = []
        for name in names:
            case = row_cases.get(name)
            if case is None:
                cells.append("")
            elif not case.fused.ran:
                cells.append(f"**{_status(case.fused)}**")
            else:
                mark = "" if case.meets_bar else " **MISS**"
                cells.append(f"{_err(case.fused)}, {_layers(case.fused)}/"
                             f"{_layers(case.plain)}{mark}")
        lines.append(f"| {family} | {form} | " + " | ".join(cells) + " |")
    return head + lines


def runtime_versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def main() -> int:
    def pick(var: str, default: list[str]) -> list[str]:
        given = os.environ.get(var, "")
        return [v for v in given.split(",") if v] or default

    families = pick("TARGETS_FAMILIES", list(FAMILIES))
    forms_wanted = pick("TARGETS_FORMS", [])
    names = pick("TARGETS_RUNTIMES", list(runtimes.RUNTIMES))
    budget = float(os.environ.get("TARGETS_BUDGET", "inf"))
    skipped = {n: why for n in names if (why := runtimes.unavailable(n))}
    names = [n for n in names if n not in skipped]
    with_target = has_target_option()
    started, cases, unrun = time.monotonic(), [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        for fam_name in families:
            if time.monotonic() - started > budget:
                unrun.append(fam_name)
                continue
            family = FAMILIES[fam_name]
            forms = [f for f in family.forms if not forms_wanted or f in forms_wanted]
            cases += run_family(family, forms, names, with_target, Path(tmp_name))
    misses = [c for c in cases if not c.meets_bar]
    head = (f"Measured on {machine()}; {runtime_versions()}. Fused "
            + ("with `--target R` for each runtime R" if with_target else
               "once per model (this onnxrep has no `--target` yet)")
            + "; inputs: the family's shape, seeded normal values; errors are relative L2 "
              "against onnxruntime with graph optimizations off; layers as the runtime "
              "builds them (without inputs and constants).")
    notes = [f"- {n}: not checked: {why}" for n, why in skipped.items()]
    if (ROOT / "bench" / "targets-tflite.md").exists() and "tflite" in skipped:
        notes.append("- tflite, from an environment of its own: bench/targets-tflite.md")
    if unrun:
        notes.append(f"- not run (time budget): {', '.join(unrun)}")
    notes.append(f"- {len(cases) - len(misses)} of {len(cases)} cases meet the bar"
                 + (": misses are marked MISS" if misses else ""))
    summary = [head, "", "Cell: rel L2 error of the fused model on that runtime, then layers "
               "fused / plain (the deploy form built in PyTorch, same export form).", "",
               *matrix(cases, names), "", *notes]
    detail = ["| family | form | runtime | converted | runs | rel L2 fused | rel L2 train | "
              "layers fused / plain / train | bar |", "|---|---|---|---|---|---|---|---|---|",
              *(row(c) for c in cases)]
    failures = [f"- {c.family} {c.form} {c.runtime}: {c.fused.error}"
                for c in cases if not c.fused.ran]
    text = "\n".join(summary)
    out = Path(os.environ.get("TARGETS_OUT") or ROOT / "bench" / "targets.md")
    out.write_text(
        text + "\n\n## Every case\n\n" + "\n".join(detail) + "\n"
        + ("\n## Failures\n\n" + "\n".join(failures) + "\n" if failures else ""))
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START in content and END in content and not os.environ.get("TARGETS_OUT"):
        before, rest = content.split(START, 1)
        readme.write_text(f"{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    print(text)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
