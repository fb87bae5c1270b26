"""The wheel carries what the code loads at run time: the label sets and bundled models of ``data/``
(as ``indexer/data/``, where indexer.resources looks first). scripts/wheel_smoke.sh, which CI runs,
installs the wheel outside the checkout and uses it; this test only builds it and reads its file list."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT_FROM = {".venv", ".git", "build", "dist", "out", "tests", "__pycache__", ".pytest_cache"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the checkout (a build in place writes build/ into it)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=lambda _d, names: [n for n in names
                                                        if n in NOT_BUILT_FROM or n.endswith(".egg-info")])
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(work / "dist")], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    (built,) = (work / "dist").glob("lookalike-*.whl")
    return built


def test_the_wheel_carries_the_data_folder(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"indexer/data/{p.relative_to(ROOT / 'data').as_posix()}"
              for p in (ROOT / "data").rglob("*") if p.is_file()}
    assert wanted, "data/ is empty"
    assert sorted(wanted - names) == []
    for loaded in ("indexer/data/labels/retail.yaml", "indexer/data/models/test-tiny/open_clip_config.json",
                   "indexer/data/models/lookalike-base/open_clip_model.safetensors",
                   "indexer/data/models/lookalike-base/glove_vocab.txt", "server/static/index.html"):
        assert loaded in names


def test_the_code_finds_data_in_a_checkout():
    from indexer import labels, modelspec, resources

    assert resources.DATA_DIR == ROOT / "data"  # no indexer/data/ in a checkout: the top-level folder
    assert modelspec.BUNDLED_MODELS_DIR == resources.DATA_DIR / "models"
    assert labels.DEFAULT_LABELS_FILE.is_file() and labels.DEFAULT_LABELS_FILE.is_relative_to(resources.DATA_DIR)
    assert {"lookalike-base", "test-tiny"} <= set(modelspec.bundled_models())
