"""The command line: `onnxrep fuse`, `onnxrep verify`, `onnxrep rules`, end to end through the
installed console script, plus in-process (click's CliRunner) where a rule is patched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxrep
from onnxrep import kernels, local_check
from onnxrep.cli import main
from onnxrep.rules import RULES, TARGET_RULES
from tests.helpers import (
    assert_one_line_error,
    binary,
    bn,
    chain,
    cli,
    conv,
    dims,
    make_model,
    op_counts,
    rand,
    run,
)

IR_VERSION, OPSET = 8, 17  # not the defaults: the output must keep what the input had


def model_with_folds() -> onnx.ModelProto:
    """conv -> bn -> scale(Mul) -> relu -> conv2 -> bn2: 2 fold-bn + 1 fold-affine."""
    nodes, inits = chain(
        conv("conv", "x", rand(16, 3, 3, 3, seed=1), rand(16, seed=2), pads=[1, 1, 1, 1]),
        bn("bn", "conv_out", 16, seed=3),
        binary("Mul", "scale", "bn_out", rand(1, 16, 1, 1, seed=4, low=0.5, high=2.0)),
        conv("conv2", "scale_out", rand(8, 16, 3, 3, seed=5), None, strides=[2, 2],
             pads=[1, 1, 1, 1]),
        bn("bn2", "conv2_out", 8, out="y", seed=6))
    return make_model(nodes, [("x", ["batch", 3, 16, 16])], [("y", None)], inits,
                      opset=OPSET, ir_version=IR_VERSION)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(model_with_folds(), str(path))
    return path


def test_fuse_writes_model_and_report(model_path: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = cli("fuse", model_path, out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "rules applied: fold-bn x2, fold-affine x1" in proc.stdout
    assert "verification: passed" in proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    fused = onnx.load(str(out))
    assert op_counts(fused) == {"Conv": 2}

    report = json.loads(report_path.read_text())
    assert report["ops_before"] == {"BatchNormalization": 2, "Conv": 2, "Mul": 1}
    assert report["ops_after"] == {"Conv": 2}
    assert report["nodes_before"] == 5 and report["nodes_after"] == 2
    assert report["rules_applied"] == {"fold-bn": 2, "fold-affine": 1}
    assert len(report["applied"]) == 3
    assert {tuple(a["removed"]) for a in report["applied"]} == {
        ("conv", "bn"), ("conv", "scale"), ("conv2", "bn2")}
    for record in report["applied"]:
        assert set(record) == {"rule", "removed", "added", "why", "checked"} and record["why"]
        assert record["checked"].startswith("checked: ")
    assert report["verification"]["passed"] is True
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    assert report["destination"] == str(out)
    assert report["params_after"] < report["params_before"]


def test_provenance_on_nodes_and_model(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli("fuse", model_path, out, "-q").returncode == 0
    fused = onnx.load(str(out))
    docs = {n.name: n.doc_string for n in fused.graph.node}
    # short: rule ids with a count, and how many input nodes (the lists are in the JSON report)
    assert docs["conv"] == "onnxrep: fold-bn x1, fold-affine x1; 3 input nodes"
    assert docs["conv2"] == "onnxrep: fold-bn x1; 2 input nodes"
    meta = {p.key: p.value for p in fused.metadata_props}
    assert meta["onnxrep.version"] == onnxrep.__version__
    assert json.loads(meta["onnxrep.rules_applied"]) == {"fold-bn": 2, "fold-affine": 1}
    verification = json.loads(meta["onnxrep.verification"])
    assert verification["status"] == "passed" and verification["worst_rel_l2"] <= 1e-5


def test_output_keeps_names_dtypes_dynamic_dims_opset_and_ir(model_path: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli("fuse", model_path, out, "-q").returncode == 0
    source, fused = onnx.load(str(model_path)), onnx.load(str(out))
    assert fused.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in fused.opset_import] == [("", OPSET)]
    for a, b in ((source.graph.input, fused.graph.input), (source.graph.output,
                                                            fused.graph.output)):
        assert [i.name for i in a] == [i.name for i in b]
        assert [dims(i) for i in a] == [dims(i) for i in b]
        assert [i.type.tensor_type.elem_type for i in a] == [i.type.tensor_type.elem_type
                                                             for i in b]
    assert dims(fused.graph.input[0])[0] == "batch"
    assert dims(fused.graph.output[0]) == ["batch", 8, 8, 8]
    x = rand(5, 3, 16, 16, seed=9)  # a batch of 5 runs through the fused model
    (ref,), (new,) = run(source, {"x": x}), run(fused, {"x": x})
    np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4)


def test_input_shape_sets_the_verification_batch(model_path: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    proc = cli("fuse", model_path, tmp_path / "out.onnx", "-q", "--input-shape",
               "x:4,3,16,16", "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report_path.read_text())["verification"]["input_shapes"] == {
        "x": [4, 3, 16, 16]}


def test_external_data_in_external_data_out(tmp_path: Path) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.onnx"
    onnx.save(model_with_folds(), str(src), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    out = out_dir / "out.onnx"
    proc = cli("fuse", src, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.onnx", "out.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in header.graph.initializer)
    assert {e.value for t in header.graph.initializer for e in t.external_data
            if e.key == "location"} == {"out.onnx.data"}
    onnx.checker.check_model(str(out))
    fused = onnx.load(str(out))  # loads out.onnx.data from beside it
    assert op_counts(fused) == {"Conv": 2}
    assert cli("verify", src, out).returncode == 0


def test_rules_and_skip_select_rules(model_path: Path, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"
    assert cli("fuse", model_path, tmp_path / "a.onnx", "-q", "--rules", "fold-bn",
               "--report", r1).returncode == 0
    assert json.loads(r1.read_text())["rules_applied"] == {"fold-bn": 2}
    assert cli("fuse", model_path, tmp_path / "b.onnx", "-q", "--skip", "fold-affine",
               "--report", r2).returncode == 0
    assert json.loads(r2.read_text())["ops_after"] == {"Conv": 2, "Mul": 1}


@pytest.mark.parametrize("option", ["--rules", "--skip"])
def test_unknown_rule_id_is_a_usage_error(model_path: Path, tmp_path: Path,
                                          option: str) -> None:
    out = tmp_path / "out.onnx"
    proc = cli("fuse", model_path, out, option, "fold-bn,no-such-rule")
    line = assert_one_line_error(proc.returncode, proc.stderr)
    assert "no-such-rule" in line
    assert not out.exists()


def test_rules_command_lists_every_rule_in_order() -> None:
    proc = cli("rules")
    assert proc.returncode == 0
    ids = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    targeted = [r.id for rules in TARGET_RULES.values() for r in rules]
    assert ids == [r.id for r in RULES] + targeted
    assert all(f"--target {t} only" in proc.stdout for t in TARGET_RULES)
    assert "fold-bn" in ids and "fold-affine" in ids and "fold-bn-forward" in ids


def test_verify_command(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli("fuse", model_path, out, "-q").returncode == 0
    same = cli("verify", model_path, out)
    assert same.returncode == 0 and "equivalent" in same.stdout

    wrong = onnx.load(str(out))
    bias = next(t for t in wrong.graph.initializer if t.name == wrong.graph.node[-1].input[2])
    value = onnx.numpy_helper.to_array(bias).copy()
    value[3] += 0.05
    bias.CopyFrom(onnx.numpy_helper.from_array(value, bias.name))
    wrong_path = tmp_path / "wrong.onnx"
    onnx.save(wrong, str(wrong_path))
    different = cli("verify", model_path, wrong_path)
    assert different.returncode == 1 and "DIFFERENT" in different.stdout
    assert "Traceback" not in different.stderr


def test_explain_prints_near_misses(tmp_path: Path) -> None:
    nodes, inits = chain(conv("conv", "x", rand(4, 3, 3, 3), rand(4)),
                         bn("bn", "conv_out", 4, out="y"))
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", None), ("conv_out", None)], inits)
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    proc = cli("fuse", src, tmp_path / "out.onnx", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "fold-bn at bn: conv_out is a graph output" in proc.stdout


def test_no_verify_is_recorded(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = cli("fuse", model_path, out, "--no-verify")
    assert proc.returncode == 0
    assert "verification: skipped" in proc.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["onnxrep.verification"]) == {"status": "skipped"}


# --- verification failure: a rule patched to write a wrong bias ------------------------------


@pytest.fixture
def wrong_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    honest = kernels.scale_bias

    def off_by_a_little(bias, a, c):  # noqa: ANN001, ANN202
        return honest(bias, a, c) + 1e-3

    monkeypatch.setattr(kernels, "scale_bias", off_by_a_little)


@pytest.fixture
def local_checks_miss_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong rewrite that the local checks do not catch (they sample): the whole-model
    verification is the last line."""
    monkeypatch.setattr(local_check, "check", lambda graph, replacement, seed=0:
                        local_check.LocalCheck(True, 0, "not checked: test"))


def test_a_wrong_rewrite_is_refused_by_its_local_check(model_path: Path, tmp_path: Path,
                                                       wrong_bias: None) -> None:
    """The rewrites are refused one by one, naming the rule; the model is written as it was
    (verified), exit 0."""
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(model_path), str(out), "--explain"])
    assert result.exit_code == 0, result.output
    assert "rules applied: none" in result.output
    assert "local check failed, rewrite not applied" in result.output
    assert "a bug in rule fold-bn" in result.output
    assert out.exists()


def test_verification_failure_writes_nothing(model_path: Path, tmp_path: Path,
                                             wrong_bias: None, local_checks_miss_it: None
                                             ) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["fuse", str(model_path), str(out),
                                       "--report", str(report_path)])
    assert result.exit_code == 1, result.output
    assert "verification failed: nothing written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "r.json"])
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is False
    assert report["destination"] is None

    api_result = onnxrep.fuse(str(model_path))
    assert not api_result.verified


def test_verification_failure_with_force_writes(model_path: Path, tmp_path: Path,
                                                wrong_bias: None, local_checks_miss_it: None
                                                ) -> None:
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(model_path), str(out), "--force", "-q"])
    assert result.exit_code == 1
    assert "written anyway (--force)" in result.stderr
    assert out.exists()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["onnxrep.verification"])["status"] == "failed"


def test_rules_that_do_not_converge_exit_3(model_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error (not bad input): exit 3, one line, nothing written."""
    from tests.helpers import Swap

    monkeypatch.setattr("onnxrep.rules.RULES",
                        [Swap("conv-to-conv", "Conv", "Conv")])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fuse", str(model_path), str(out)])
    line = assert_one_line_error(result.exit_code, result.stderr, code=3)
    assert "conv-to-conv" in line
    assert not out.exists()
