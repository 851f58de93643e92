"""Issue 4 end to end: DBB (BN-and-pad fills, avg branches), OREPA (kernels computed in the
forward pass) and Inception-style concat, exported by torch in every form the exporters
accept, through the CLI to exactly the op set of their plain export, verified."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

import onnxrep
from models import registry
from tests.helpers import CANONICAL, cli, export_families

pytestmark = pytest.mark.torch

FAMILIES = ["dbb", "dbb_dense", "orepa", "orepa_ts"]
CASES = [(name, form) for name in FAMILIES for form in registry.FAMILIES[name].forms]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """family -> {form: path, form-plain: path}, each family exported once per form."""
    return export_families(tmp_path_factory.mktemp("dbb"), FAMILIES)


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_block_becomes_one_conv(name: str, form: str, exported: dict, tmp_path: Path) -> None:
    src, out, rep = exported[name][form], tmp_path / "fused.onnx", tmp_path / "r.json"
    dims = ",".join(str(d) for d in registry.FAMILIES[name].input_shape[1:])
    start = time.perf_counter()
    proc = cli("fuse", src, out, "--report", rep, "-q", "--input-shape", f"input:2,{dims}")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"]
    assert report["verification"]["worst_rel_l2"] <= 1e-5
    # both sides in canonical plain ops (global-pool, flatten), nothing else
    plain = onnxrep.fuse(exported[name][f"{form}-plain"], rules=CANONICAL, verify=False)
    assert Counter(report["ops_after"]) == plain.report.ops_after
    print(f"{name} {form}: {report['nodes_before']} -> {report['nodes_after']} nodes "
          f"in {seconds:.2f} s")
    assert not onnxrep.fuse(out).report.applied
