"""The ``lookalike`` command stays light: ``--help``, each command's ``--help`` and ``lookalike info``
import neither torch nor the server (a model load costs seconds, help should not)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a fresh interpreter, then fails if a heavy package was imported on the way.
RUN_AND_CHECK = """
import sys
from indexer.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "open_clip", "server", "fastapi") if m in sys.modules]
if heavy:
    print("imported: " + ", ".join(heavy), file=sys.stderr)
    sys.exit(99)
sys.exit(code)
"""


def _light_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_AND_CHECK, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    """An index of three generated photos made with the bundled random-weight ``test-tiny`` model."""
    from PIL import Image

    root = tmp_path_factory.mktemp("light")
    photos = root / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 40), colour).save(photos / f"p{i}.png")
    out = root / "index"
    r = subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(photos), "--out", str(out), "--model",
                        "test-tiny", "--device", "cpu", "--backend", "torch", "--workers", "0", "-q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return out


def _commands() -> list[str]:
    from indexer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    return sorted(sub.choices)


def test_importing_the_cli_imports_neither_torch_nor_the_server():
    r = subprocess.run([sys.executable, "-c", "import sys, indexer.cli; "
                        "print(sorted(m for m in ('torch', 'faiss', 'server') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_help_is_light():
    r = _light_run("--help")
    assert r.returncode == 0, r.stderr
    assert "index" in r.stdout and "serve" in r.stdout


@pytest.mark.parametrize("command", _commands())
def test_command_help_is_light(command):
    r = _light_run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: lookalike {command}")


def test_info_is_light(tiny_index):
    r = _light_run("info", str(tiny_index))
    assert r.returncode == 0, r.stderr
    assert "3 products, 3 photos" in r.stdout
    assert "model: test-tiny" in r.stdout


def test_info_json_is_light(tiny_index):
    r = _light_run("info", str(tiny_index), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["products"] == 3 and info["model"]["name"] == "test-tiny"
