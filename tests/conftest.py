"""One place decides what runs without torch: tests marked `torch` (a file with
`pytestmark = pytest.mark.torch`, or one test) are skipped with a reason when torch is not
installed, and files that are wholly torch's are not even imported then."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HAVE_TORCH = importlib.util.find_spec("torch") is not None
_WHOLE_FILE = "pytestmark = pytest.mark.torch"

collect_ignore = [] if HAVE_TORCH else [
    p.name for p in Path(__file__).parent.glob("test_*.py") if _WHOLE_FILE in p.read_text()]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if HAVE_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch (pip install -e '.[test]')")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)
