"""Bad input through the real console script: exit 2, ONE line on stderr, no traceback, and
no output file - nor any stray temp file - left in the output folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxrep.cli import main
from tests.helpers import (
    assert_one_line_error,
    bn,
    chain,
    cli,
    const,
    conv,
    make_model,
    node,
    op_counts,
    rand,
)


def small_model() -> onnx.ModelProto:
    nodes, inits = chain(conv("conv", "x", rand(32, 16, 3, 3), rand(32), pads=[1, 1, 1, 1]),
                         bn("bn", "conv_out", 32, out="y"))
    return make_model(nodes, [("x", ["N", 16, 8, 8])], [("y", None)], inits)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


def listing(*folders: Path) -> dict[str, list[str]]:
    """The names in each folder that exists (a missing folder must stay missing)."""
    return {str(f): sorted(p.name for p in f.iterdir()) if f.exists() else ["<missing>"]
            for f in folders}


def expect_bad(src: Path, dst_dir: Path, *extra: str, words: tuple[str, ...] = ()) -> str:
    """`onnxrep fuse src dst_dir/out.onnx` exits 2 with one line and leaves nothing behind."""
    before = listing(src.parent, dst_dir, dst_dir.parent)
    proc = cli("fuse", src, dst_dir / "out.onnx", *extra)
    line = assert_one_line_error(proc.returncode, proc.stderr)
    after = listing(src.parent, dst_dir, dst_dir.parent)
    assert after == before  # no out.onnx, no out.onnx.data, no .onnxrep-* temp folder
    for word in words:
        assert word in line, line
    return line


def test_missing_file(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    expect_bad(src / "nope.onnx", dst, words=("nope.onnx", "no such file"))


def test_a_directory(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    (src / "model.onnx").mkdir()
    expect_bad(src / "model.onnx", dst, words=("is a directory",))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(folders: tuple[Path, Path], seed: int) -> None:
    src, dst = folders
    path = src / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    expect_bad(path, dst, words=("not an ONNX model",))


@pytest.mark.parametrize("text", ["hello, world\n", "name,value\na,1\nb,2\n",
                                  "ir_version: 8\ngraph { name: 'g' }\n"],
                         ids=["text", "csv", "prototxt"])
def test_a_text_file(folders: tuple[Path, Path], text: str) -> None:
    src, dst = folders
    path = src / "model.onnx"
    path.write_text(text)
    expect_bad(path, dst, words=("not an ONNX model",))


def test_an_empty_file(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = src / "empty.onnx"
    path.write_bytes(b"")
    expect_bad(path, dst, words=("not an ONNX model",))


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_model_file(folders: tuple[Path, Path], fraction: float) -> None:
    src, dst = folders
    data = small_model().SerializeToString()
    path = src / "cut.onnx"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    expect_bad(path, dst, words=("cut.onnx",))


def test_every_cut_of_an_external_data_header_is_refused(tmp_path: Path) -> None:
    """Every prefix of a small .onnx header (weights in .data): exit 2, one line, no file.
    In-process (CliRunner) to keep ~1000 runs cheap; the contract is the same."""
    onnx.save(small_model(), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    data = (tmp_path / "m.onnx").read_bytes()
    cut_path, out = tmp_path / "cut.onnx", tmp_path / "out.onnx"
    runner = CliRunner()
    for cut in range(len(data)):
        cut_path.write_bytes(data[:cut])
        result = runner.invoke(main, ["fuse", str(cut_path), str(out), "-q"])
        assert_one_line_error(result.exit_code, result.stderr)
        assert not out.exists(), cut


def external_model(folder: Path) -> Path:
    path = folder / "model.onnx"
    onnx.save(small_model(), str(path), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    return path


def test_missing_external_data_file(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = external_model(src)
    (src / "model.onnx.data").unlink()
    expect_bad(path, dst, words=("external data", "model.onnx.data"))


@pytest.mark.parametrize("keep", [0, 100, 0.5, -4])
def test_truncated_external_data_file(folders: tuple[Path, Path], keep: float) -> None:
    src, dst = folders
    path = external_model(src)
    data_file = src / "model.onnx.data"
    data = data_file.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    data_file.write_bytes(data[:size])
    expect_bad(path, dst, words=("model.onnx",))


def test_output_folder_missing(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    expect_bad(path, dst / "missing", words=("output folder does not exist",))


def test_report_folder_missing_or_a_directory(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    expect_bad(path, dst, "--report", str(dst / "missing" / "r.json"),
               words=("report folder does not exist",))
    (src / "r.json").mkdir()
    expect_bad(path, dst, "--report", str(src / "r.json"), words=("is a directory",))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("report_is", ["input", "output", "input-data", "output-data"])
def test_the_report_never_overwrites_a_model_file(folders: tuple[Path, Path],
                                                  report_is: str) -> None:
    """--report naming the input, the output or a data file: exit 2 before anything is
    written (the model included), every file as it was."""
    src, dst = folders
    path = external_model(src)
    out = dst / "out.onnx"
    out.write_bytes(b"the user's old output")
    report = {"input": path, "output": out, "input-data": src / "model.onnx.data",
              "output-data": dst / "out.onnx.data"}[report_is]
    if report_is == "output-data":
        report.write_bytes(b"the user's old data")
    before = _snapshot(src) | {f"dst/{k}": v for k, v in _snapshot(dst).items()}
    proc = cli("fuse", path, out, "--report", report)
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "the report would overwrite" in line, line
    assert before == _snapshot(src) | {f"dst/{k}": v for k, v in _snapshot(dst).items()}


def test_the_output_data_file_never_overwrites_the_inputs_data(tmp_path: Path) -> None:
    """An input reading b.onnx.data, written to b.onnx beside it: the output's data file would
    replace the data the input model reads."""
    path = tmp_path / "a.onnx"
    onnx.save(small_model(), str(path), save_as_external_data=True, location="b.onnx.data",
              size_threshold=0)
    before = _snapshot(tmp_path)
    proc = cli("fuse", path, tmp_path / "b.onnx")
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "refusing to overwrite b.onnx.data, which the input model reads" in line, line
    assert _snapshot(tmp_path) == before
    forced = cli("fuse", path, tmp_path / "b.onnx", "--force", "-q")
    assert forced.returncode == 0, forced.stderr


def test_an_unwritable_report_folder_is_refused_before_the_model_is_written(
        folders: tuple[Path, Path]) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    locked = dst / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    expect_bad(path, dst, "--report", str(locked / "r.json"), words=("cannot write the report",))


def test_a_model_that_does_not_run_at_the_default_size_says_how_to_give_one(
        folders: tuple[Path, Path]) -> None:
    """A Reshape to [5, -1] admits no batch of 1 to 4 (the ones tried when no size is given):
    one line that names the input, what was tried and --input-shape (onnxruntime's own log
    lines stay silent)."""
    src, dst = folders
    path = src / "model.onnx"
    nodes = [node("Relu", ["x"], ["r"], "relu"), node("Reshape", ["r", "shape"], ["y"], "rs")]
    onnx.save(make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", None)],
                         [const("shape", np.array([5, -1]), np.int64)]), str(path))
    line = expect_bad(path, dst, words=("x[N, 3, 4, 4]", "batch 1, 2, 3, 4", "--input-shape x:"))
    assert line.startswith("onnxrep: error: no size found at which the input model runs")
    line = expect_bad(path, dst, "--input-shape", "x:2,3,4,4", words=("x[2, 3, 4, 4]",))
    assert line.startswith("onnxrep: error: the input model does not run at x[2, 3, 4, 4]")
    proc = cli("fuse", path, dst / "out.onnx", "--input-shape", "x:5,3,4,4", "-q")
    assert proc.returncode == 0, proc.stderr


def test_bad_input_shape_spec(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    expect_bad(path, dst, "--input-shape", "x=1,16,8,8", words=("--input-shape",))
    expect_bad(path, dst, "--input-shape", "nosuch:1,16,8,8", words=("nosuch",))


def test_output_is_the_input(folders: tuple[Path, Path]) -> None:
    src, _ = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    pristine = path.read_bytes()
    proc = cli("fuse", path, path)
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "refusing to overwrite the input" in line and "--force" in line
    assert path.read_bytes() == pristine
    assert sorted(p.name for p in src.iterdir()) == ["model.onnx"]

    forced = cli("fuse", path, path, "--force", "-q")
    assert forced.returncode == 0, forced.stderr
    assert op_counts(onnx.load(str(path))) == {"Conv": 1}
    assert sorted(p.name for p in src.iterdir()) == ["model.onnx"]


def test_output_is_a_directory(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(small_model(), str(path))
    (dst / "out.onnx").mkdir()
    proc = cli("fuse", path, dst / "out.onnx")
    assert "is a directory" in assert_one_line_error(proc.returncode, proc.stderr)
    assert listing(dst) == {str(dst): ["out.onnx"]}


def unknown_op_model(domain: str) -> onnx.ModelProto:
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 1, 1), rand(8)),
                         bn("bn", "conv_out", 8, out="t"))
    nodes.append(node("Mystery", ["t"], ["y"], "mystery", domain=domain))
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 8, 4, 4])], inits,
                       check=False)
    if domain:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return model


def test_unknown_custom_domain_op(folders: tuple[Path, Path]) -> None:
    """An op of a custom domain passes the onnx checker but onnxruntime cannot run it:
    with verification that is bad input (exit 2, nothing written). With --no-verify the
    rules still run around it and the model is written, the unknown node untouched."""
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(unknown_op_model("com.example"), str(path))
    expect_bad(path, dst, words=("onnxruntime cannot load",))

    proc = cli("fuse", path, dst / "out.onnx", "--no-verify", "-q")
    assert proc.returncode == 0, proc.stderr
    fused = onnx.load(str(dst / "out.onnx"))
    assert op_counts(fused) == {"Conv": 1, "Mystery": 1}
    assert [(o.domain, o.version) for o in fused.opset_import] == [("", 18), ("com.example", 1)]


def test_unknown_default_domain_op(folders: tuple[Path, Path]) -> None:
    """An op the default domain does not have fails the onnx checker at load: exit 2, with or
    without verification."""
    src, dst = folders
    path = src / "model.onnx"
    onnx.save(unknown_op_model(""), str(path))
    expect_bad(path, dst, words=("invalid ONNX model", "Mystery"))
    expect_bad(path, dst, "--no-verify", words=("invalid ONNX model", "Mystery"))


def test_training_mode_bn_passes_through(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    nodes, inits = chain(conv("conv", "x", rand(8, 3, 3, 3), rand(8)),
                         bn("bn", "conv_out", 8, out=["y", "rm", "rv"], training_mode=1))
    path = src / "model.onnx"
    onnx.save(make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None)], inits), str(path))
    proc = cli("fuse", path, dst / "out.onnx", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "training_mode=1" in proc.stdout
    fused = onnx.load(str(dst / "out.onnx"))
    assert op_counts(fused) == {"Conv": 1, "BatchNormalization": 1}
    (bn_node,) = [n for n in fused.graph.node if n.op_type == "BatchNormalization"]
    assert any(a.name == "training_mode" and a.i == 1 for a in bn_node.attribute)


def test_verify_command_with_bad_files(folders: tuple[Path, Path]) -> None:
    src, dst = folders
    good = src / "model.onnx"
    onnx.save(small_model(), str(good))
    junk = src / "junk.onnx"
    junk.write_bytes(b"\x00\x01junk")
    for a, b in ((good, src / "missing.onnx"), (junk, good)):
        proc = cli("verify", a, b)
        assert_one_line_error(proc.returncode, proc.stderr)
