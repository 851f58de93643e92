"""Every model family exports in each of its forms and onnxruntime reproduces torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.export import FORMS, batch_is_dynamic, export, export_forms
from models.make_examples import EXAMPLES, EXAMPLES_DIR, MAX_BYTES
from models.registry import FAMILIES, Family
from onnxrep.verify import session

pytestmark = pytest.mark.torch

RTOL = 1e-5

CASES = [(name, form) for name, fam in FAMILIES.items() for form in fam.forms]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _session(path: Path) -> ort.InferenceSession:
    return session(path, threads=1)


_TRAIN_CACHE: dict[str, torch.nn.Module] = {}
_EXPORT_CACHE: dict[str, dict[str, Path]] = {}


def _train_model(fam: Family) -> torch.nn.Module:
    if fam.name not in _TRAIN_CACHE:
        _TRAIN_CACHE[fam.name] = fam.build_train()
    return _TRAIN_CACHE[fam.name]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


def _exported(fam: Family, out_dir: Path) -> dict[str, Path]:
    """All forms of a family, exported once (the dynamo forms share one translation)."""
    if fam.name not in _EXPORT_CACHE:
        paths = {form: out_dir / f"{fam.name}-{form}.onnx" for form in fam.forms}
        _EXPORT_CACHE[fam.name] = export_forms(_train_model(fam), fam.input_shape, paths)
    return _EXPORT_CACHE[fam.name]


def test_registry_is_consistent() -> None:
    assert FAMILIES
    for name, fam in FAMILIES.items():
        assert fam.name == name
        assert fam.forms and set(fam.forms) <= set(FORMS), name
        if set(fam.forms) != set(FORMS):
            assert fam.note, f"{name}: a missing form needs a note"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_train_and_plain_shapes_match(name: str) -> None:
    fam = FAMILIES[name]
    x = torch.randn(*fam.input_shape, generator=torch.Generator().manual_seed(0))
    train, plain = _train_model(fam), fam.build_plain()
    assert not train.training and not plain.training
    with torch.no_grad():
        assert train(x).shape == plain(x).shape


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_build_is_deterministic(name: str) -> None:
    fam = FAMILIES[name]
    a, b = _train_model(fam).state_dict(), fam.build_train().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (name, k)


@pytest.mark.parametrize(("name", "form"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_export_matches_torch(name: str, form: str, export_dir: Path) -> None:
    fam = FAMILIES[name]
    model = _train_model(fam)
    path = _exported(fam, export_dir)[form]
    assert path.exists()
    if form.startswith("dynamo"):
        assert Path(str(path) + ".data").exists()
    onnx.checker.check_model(str(path))
    sess = _session(path)
    batches = [fam.input_shape[0]]
    if batch_is_dynamic(path):
        batches.append(2)
    else:  # the exporter fell back to a static batch: the family must say so
        assert "static batch" in fam.note, f"{name}/{form}: batch is static"
    gen = torch.Generator().manual_seed(1)
    for n in batches:
        x = torch.randn(n, *fam.input_shape[1:], generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        (out,) = sess.run(None, {"input": x.numpy()})
        assert out.shape == ref.shape
        err = _rel_l2(out, ref)
        assert err <= RTOL, f"{name}/{form} batch {n}: rel L2 {err:.3g}"


def test_single_form_export(tmp_path: Path) -> None:
    fam = FAMILIES["repvgg"]
    path = export(fam.build_plain(), fam.input_shape, tmp_path / "plain.onnx", "ts-folded")
    assert path.exists() and batch_is_dynamic(path)
    assert not Path(str(path) + ".data").exists()
    with pytest.raises(ValueError):
        export(fam.build_plain(), fam.input_shape, tmp_path / "x.onnx", "nope")


@pytest.mark.parametrize("filename", sorted(EXAMPLES))
def test_bundled_example(filename: str) -> None:
    """The committed examples are small single files with a dynamic batch that still match
    the registry model (regenerate with ``python -m models.make_examples``)."""
    path = EXAMPLES_DIR / filename
    assert path.exists(), "run python -m models.make_examples"
    assert path.stat().st_size < MAX_BYTES
    model = onnx.load(str(path))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert batch_is_dynamic(path)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" in ops  # TorchScript, unfolded
    fam = FAMILIES[EXAMPLES[filename]]
    x = torch.randn(2, *fam.input_shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _train_model(fam)(x).numpy()
    (out,) = _session(path).run(None, {"input": x.numpy()})
    assert _rel_l2(out, ref) <= RTOL
