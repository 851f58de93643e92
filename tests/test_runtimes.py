"""`onnxrep check --runtime R` and `fuse --check-runtime R` (onnxrep/runtimes.py): the CLI's
answers (exit 0 / 1 / 2, one line when R is missing), the child-process isolation, pnnx on
external data from another folder; and, marked `targets` (`make targets`, deselected by
`make test`), every models/ family in every form fused and run on every installed runtime."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxrep import runtimes
from onnxrep.cli import main
from onnxrep.runtimes import Converted, Job, RuntimeCheck
from tests.helpers import assert_one_line_error, chain, cli, conv, make_model, node, rand

EXAMPLE = Path(__file__).resolve().parent.parent / "models" / "examples" / "repvgg_tiny.onnx"


def tiny_model() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 3x3 (8 channels) -> Relu -> y."""
    nodes, inits = chain(conv("c", "x", rand(8, 3, 3, 3, seed=1), rand(8, seed=2),
                              pads=[1, 1, 1, 1]))
    nodes.append(node("Relu", ["c_out"], ["y"]))
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits)


def installed(name: str) -> bool:
    return runtimes.unavailable(name) is None


@pytest.fixture
def missing_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO as if its package were not installed."""
    fake = dataclasses.replace(runtimes.RUNTIMES["openvino"], modules=("onnxrep_no_such_pkg",))
    monkeypatch.setitem(runtimes.RUNTIMES, "openvino", fake)


def test_runtime_names_are_the_target_names() -> None:
    targets = pytest.importorskip("onnxrep.targets")
    assert set(runtimes.RUNTIMES) == set(targets.TARGETS)


def test_check_missing_package_is_one_line_with_the_install_command(missing_openvino: None
                                                                    ) -> None:
    result = CliRunner().invoke(main, ["check", str(EXAMPLE), "--runtime", "openvino"])
    line = assert_one_line_error(result.exit_code, result.stderr)
    assert "pip install 'onnxrep[openvino]'" in line


def test_fuse_check_runtime_missing_package_fails_before_writing(missing_openvino: None,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(EXAMPLE), str(out), "-q",
                                       "--check-runtime", "openvino"])
    line = assert_one_line_error(result.exit_code, result.stderr)
    assert "pip install 'onnxrep[openvino]'" in line
    assert not out.exists()


def test_tensorrt_without_gpu_is_skipped_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dataclasses.replace(runtimes.RUNTIMES["tensorrt"], modules=("numpy",))
    monkeypatch.setitem(runtimes.RUNTIMES, "tensorrt", fake)
    monkeypatch.setattr(runtimes, "_has_gpu", lambda: False)
    result = CliRunner().invoke(main, ["check", str(EXAMPLE), "--runtime", "tensorrt"])
    line = assert_one_line_error(result.exit_code, result.stderr)
    assert "skipped: tensorrt needs a CUDA GPU" in line


def test_unknown_runtime_is_one_line() -> None:
    proc = cli("check", EXAMPLE, "--runtime", "coreml")
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "unknown runtime 'coreml'" in line and "openvino" in line


def test_check_on_onnxruntime_agrees_and_counts_layers() -> None:
    proc = cli("check", EXAMPLE, "--runtime", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("onnxruntime: ") and " layers" in lines[0]
    assert "max|err|" in lines[1] and "rel L2" in lines[1] and lines[1].endswith(
        "ok (tolerance rel L2 1e-05)")
    assert lines[-1] == "ok"


def test_fuse_check_runtime_checks_the_written_file(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = cli("fuse", EXAMPLE, out, "-q", "--check-runtime", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert proc.stdout.startswith("onnxruntime: input ") and proc.stdout.endswith("\nok\n")


def test_check_reports_a_runtime_that_differs_with_exit_1(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    def off_by_one_percent(name: str, jobs: list[Job]) -> list[tuple[Converted, str, str]]:
        (job,) = jobs
        reference = runtimes.session(job.model).run(job.outputs, job.feeds)
        return [(Converted([o * 1.01 for o in reference], 7), "run", "")]

    monkeypatch.setattr(runtimes, "run_isolated", off_by_one_percent)
    result = CliRunner().invoke(main, ["check", str(EXAMPLE), "--runtime", "onnxruntime"])
    assert result.exit_code == 1, result.output
    assert "7 layers" in result.stdout and "FAIL" in result.stdout


def test_check_reports_a_conversion_failure_with_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtimes, "run_isolated",
                        lambda *a: [(None, "convert", "Unsupported op FooBar")])
    result = CliRunner().invoke(main, ["check", str(EXAMPLE), "--runtime", "onnxruntime"])
    assert result.exit_code == 1
    assert "does not convert: Unsupported op FooBar" in result.stdout


def test_a_failing_child_becomes_an_error_not_a_crash(tmp_path: Path) -> None:
    """The child process reports what went wrong and where, whatever the adapter raised."""
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(path))
    feeds = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    jobs = [runtimes.Job(path, feeds, ["y"])] * 2
    for result, stage, error in runtimes.run_isolated("no-such-runtime", jobs):
        assert result is None and stage == "convert" and "KeyError" in error


CRASHING_CHILD = """
import dataclasses, os, sys
from onnxrep import runtimes as r
real = r.RUNTIMES["onnxruntime"].adapter
def adapter(path, *rest):
    if path.name == "crash.onnx":
        os._exit(9)
    return real(path, *rest)
r.RUNTIMES["onnxruntime"] = dataclasses.replace(r.RUNTIMES["onnxruntime"], adapter=adapter)
sys.exit(r._child(*sys.argv[1:4]))
"""


def test_a_crashing_child_costs_one_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """A runtime that kills its process on the second of three models: the first and the
    third still run (a new child goes on after the crash), the second says it crashed."""
    paths = [tmp_path / "a.onnx", tmp_path / "crash.onnx", tmp_path / "c.onnx"]
    for path in paths:
        onnx.save(tiny_model(), str(path))
    (tmp_path / "child.py").write_text(CRASHING_CHILD)
    wrapper = tmp_path / "python"  # called as: python -m onnxrep.runtimes NAME FOLDER FIRST
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / "child.py"} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("ONNXREP_ONNXRUNTIME_PYTHON", str(wrapper))
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    outcomes = runtimes.run_isolated("onnxruntime", [Job(p, feeds, ["y"]) for p in paths])
    assert [o[0] is not None for o in outcomes] == [True, False, True]
    assert outcomes[1][1:] == ("convert", "crashed (exit 9): no message")


def test_mnn_layer_count_reads_the_dump_of_infinite_constants(tmp_path: Path) -> None:
    """MNNConvert's JSON dump writes -inf bounds (a residual-removed Clip) as bare `-inf`."""
    dump = tmp_path / "m.json"
    dump.write_text('{"oplists": [{"type": "Input"}, {"type": "Const", "main": {"float32s": '
                    '[0.0, -inf, inf, nan]}, "name": "a.inf"}, {"type": "Convolution"}, '
                    '{"type": "BinaryOp", "name": "x-inf"}]}')
    assert runtimes._mnn_layers(dump) == 2
    dump.write_text("not json")
    assert runtimes._mnn_layers(dump) is None


def test_render_names_the_failed_stage() -> None:
    text = RuntimeCheck("ncnn", True, False, error="extract failed").render()
    assert "does not run: extract failed" in text and text.endswith("FAIL")


@pytest.mark.skipif(not installed("ncnn"), reason="pip install 'onnxrep[ncnn]'")
def test_ncnn_converts_external_data_from_any_folder(tmp_path: Path) -> None:
    """pnnx alone fails on external data unless run from the model's folder (issue 13)."""
    model_dir, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    model_dir.mkdir()
    elsewhere.mkdir()
    path = model_dir / "m.onnx"
    onnx.save(tiny_model(), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    proc = cli("check", path, "--runtime", "ncnn", "--input-shape", "x:2,3,8,8", cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ncnn: x 2x3x8x8; 1 layers" in proc.stdout  # pnnx fuses Conv + Relu
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    assert sorted(p.name for p in model_dir.iterdir()) == ["m.onnx", "m.onnx.data"]


# ---------------------------------------------------------------- every family, every runtime

def _family_cases() -> list:
    if importlib.util.find_spec("torch") is None:
        return []
    from models.registry import FAMILIES

    return [pytest.param(name, form, id=f"{name}-{form}")
            for name, fam in FAMILIES.items() for form in fam.forms]


@pytest.fixture(scope="module")
def target_option() -> bool:
    from bench.targets import has_target_option

    return has_target_option()


@pytest.mark.targets
@pytest.mark.torch
@pytest.mark.parametrize(("family", "form"), _family_cases())
def test_family_runs_on_every_installed_runtime(family: str, form: str, target_option: bool,
                                                tmp_path: Path) -> None:
    """Fused (with --target R where onnxrep has it), the model converts and runs on R within
    R's tolerance, and R builds no more layers for it than for the plain form built in
    PyTorch (issue 13, "Done when")."""
    from bench.targets import fuse
    from models.export import export
    from models.registry import FAMILIES

    fam = FAMILIES[family]
    names = [n for n in runtimes.RUNTIMES if installed(n)]
    src, plain = tmp_path / "train.onnx", tmp_path / "plain.onnx"
    export(fam.build_train(), fam.input_shape, src, form)
    export(fam.build_plain(), fam.input_shape, plain, form)
    shapes = {"input": list(fam.input_shape)}
    problems = []
    for name in names:
        fused = tmp_path / f"fused-{name}.onnx"
        error = fuse(src, fused, family, name if target_option else None)
        if error:
            problems.append(f"{name}: fuse failed: {error}")
            continue
        got, reference = runtimes.check_many([fused, plain], name, shapes)
        if not got.passed:
            problems.append(got.render().replace("\n", " | "))
            continue
        if None not in (got.layers, reference.layers) and got.layers > reference.layers:
            problems.append(f"{name}: {got.layers} layers, the plain form {reference.layers}")
    assert not problems, "\n".join(problems)
