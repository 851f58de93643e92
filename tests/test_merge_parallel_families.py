"""merge-parallel end to end: every issue-3 family, exported by torch in every form, goes
through the CLI to exactly the op set of its plain (deploy) export, verified, idempotent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import onnxrep
from models import registry
from tests.helpers import CANONICAL, cli, export_families

pytestmark = pytest.mark.torch
pytest.importorskip("models.export")

FAMILIES = ["repvgg", "acnet", "mobileone", "mobileone_se", "csla", "qarepvgg", "repvit",
            "repghost", "fastvit", "replknet", "inception"]
CASES = [(name, form) for name in FAMILIES for form in registry.FAMILIES[name].forms]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """family -> {form: path, form-plain: path}, each family exported once per form."""
    return export_families(tmp_path_factory.mktemp("parallel"), FAMILIES)


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_family_fuses_to_its_plain_form(name: str, form: str, exported: dict,
                                        tmp_path: Path) -> None:
    src = exported[name][form]
    out, report_path = tmp_path / "fused.onnx", tmp_path / "r.json"
    proc = cli("fuse", src, out, "--report", report_path, "-q", "--input-shape",
               f"input:2,{','.join(str(d) for d in registry.FAMILIES[name].input_shape[1:])}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"]
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    merging = "merge-concat" if name == "inception" else "merge-parallel"
    assert report["rules_applied"].get(merging, 0) >= 1
    # both sides in canonical plain ops (global-pool, flatten), nothing else
    plain = onnxrep.fuse(exported[name][f"{form}-plain"], rules=CANONICAL, verify=False)
    assert Counter(report["ops_after"]) == plain.report.ops_after
    assert "BatchNormalization" not in report["ops_after"]
    again = onnxrep.fuse(out)
    assert not again.report.applied, again.report.applied
    assert again.verified
