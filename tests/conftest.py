"""Shared fixtures: the catalogue generated for the tests (tests/fixtures/make_catalogue.py), the real
datasets beside the project for the marked runs, a small index built from the generated one, and real servers.

Markers (each module says which kind it is with ``pytestmark``):

- ``unit``: no model, no server;
- ``integration``: a model or a store, in this process (TestClient, uvicorn in a thread);
- ``system``: a real ``lookalike`` process (server subprocess or the CLI);
- ``datasets``: needs ``../shared/datasets``; set here on every test that uses the ``datasets_dir``
  fixture, so ``-m "not datasets"`` is what a bare clone runs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets"))

sys.path.insert(0, str(ROOT / "scripts"))
import serverproc  # noqa: E402
from fixtures.make_catalogue import Fixture, make_catalogue  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "datasets_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.datasets)


# Converted OpenVINO models and label embeddings go to a cache of this test run (inherited by the
# `lookalike` subprocesses the tests start), so every run converts and embeds from scratch.
_CACHE = __import__("tempfile").TemporaryDirectory(prefix="lookalike-test-cache-")
os.environ["LOOKALIKE_CACHE_DIR"] = _CACHE.name


@pytest.fixture(autouse=True)
def _default_sigchld():
    """Put SIGCHLD back to its default (ignored) after each test.

    torch's DataLoader installs a SIGCHLD handler in the main process the first time it runs
    decode workers here (torch/utils/data/_utils/signal_handling.py). With it in place, the suite
    was killed by a kernel-sent SIGSEGV (no Python traceback) when a later test's subprocess
    exited, after bf16 work on the main thread (our unconfirmed reading: the signal frame with
    live AMX state). A `lookalike` process runs its workers once and exits; the test process
    runs hundreds of tests and subprocesses after them."""
    import signal

    yield
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared datasets folder; skip when absent unless LOOKALIKE_REQUIRE_DATASETS=1 (CI)."""
    if not (DATASETS / "magento").is_dir():
        if os.environ.get("LOOKALIKE_REQUIRE_DATASETS") == "1":
            pytest.fail(f"datasets required but not found at {DATASETS}")
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random-weight CLIP (64-d, deterministic), loaded once."""
    from indexer.model import load_model

    return load_model("test-tiny", None, "cpu")


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory) -> Fixture:
    """The generated catalogue (tests/fixtures/make_catalogue.py) with its ground truth."""
    return make_catalogue(tmp_path_factory.mktemp("fixture-catalogue"))


@pytest.fixture(scope="session")
def fixture_catalogue(fixture_data: Fixture) -> Path:
    """The generated catalogue's JSONL manifest: 75 good photos of 20 products in 5 categories."""
    return fixture_data.manifest


@pytest.fixture(scope="session")
def fixture_index(fixture_catalogue, tiny_model, tmp_path_factory) -> Path:
    """An index of the generated catalogue built with the tiny model."""
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    out = tmp_path_factory.mktemp("index") / "fixture-index"
    with Store.create(out, tiny_model.identity) as store:
        index_catalogue(read_catalogue(fixture_catalogue), store, tiny_model, workers=0, progress=False)
    return out


@pytest.fixture
def index_copy(fixture_index, tmp_path) -> Path:
    """A private copy of ``fixture_index`` for a test that writes to it."""
    import shutil

    dst = tmp_path / "index"
    shutil.copytree(fixture_index, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


class LiveServer:
    """The real app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def served(index: Path, extra_env: dict | None = None):
    """``lookalike serve INDEX`` as a real subprocess on a free loopback port (scripts/serverproc.py);
    yields its base URL once /readyz answers 200. A server that exits or never gets ready fails the test."""
    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(serverproc.served(index, extra_env))
        except RuntimeError as e:
            pytest.fail(f"lookalike serve: {e}")
        yield base
