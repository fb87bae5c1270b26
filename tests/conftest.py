"""Shared fixtures: the real datasets beside the project, and small indexes built from them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared datasets folder; skip when absent unless LOOKALIKE_REQUIRE_DATASETS=1 (CI)."""
    if not (DATASETS / "magento").is_dir():
        if os.environ.get("LOOKALIKE_REQUIRE_DATASETS") == "1":
            pytest.fail(f"datasets required but not found at {DATASETS}")
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS
