"""``lookalike index --engine ray`` on real Ray clusters started by the test (indexer/pipeline_ray.py).

One two-node cluster serves the module: ``ray start --head --num-cpus 1`` and ``ray start
--address HEAD --num-cpus 1``, two separate process trees on this machine, each with its own free
ports, a 200 MB object store and a temporary folder of this run. Each node is a ``ray start --block``
process in its own session; teardown ends each session (SIGTERM, then SIGKILL) by its process group,
so no Ray process of this run outlives it, failed test or not.

What each test indexes (all with the random-weight ``test-tiny`` model):

* the whole Magento catalogue (725 photos of 191 products) with the local engine and with Ray on the
  two-node cluster: same products and photos, every vector's cosine to the local one >= 0.999; the
  run's report names the worker processes, and its node ids are the cluster's two nodes (asked of Ray
  itself), each with photos done: that is how the test knows both nodes worked;
* a slice of it (the first 240 photos), while a worker actor is killed by its PID (found as a process
  titled ``ray::MapWorker...`` below a node of this cluster) after the first commit: every photo once,
  ``lookalike check`` clean, and a third worker process (the restarted actor) in the report;
* the same slice while the driver is killed after its first commit, then again: the rerun resumes and
  ends with the same products, photos and vectors as a clean run;
* the shared ``messy-images`` folder (39 awkward files: truncated and broken images, decompression
  bombs, a zero-width GIF) with ``--ray-address local`` (Ray started by the command for the run, two
  actors): the same failures, with the same reasons, and the same index as the local engine's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SLICE = 240
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A head node and ``extra_nodes`` worker nodes on this machine, each ``ray start --block`` in its
    own session (process group), stopped by :meth:`stop` through those groups only."""

    def __init__(self, extra_nodes: int = 1, cpus_per_node: int = 1, env: dict | None = None):
        self.env = env or {"RAY_AUTH_MODE": "disabled"}  # the nodes' Ray settings
        self.temp = tempfile.mkdtemp(prefix="lkt-", dir="/tmp")  # short: unix socket paths < 107 chars
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        try:
            self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                         f"--dashboard-port={_free_port()}", f"--temp-dir={self.temp}",
                         "--node-ip-address=127.0.0.1"], cpus_per_node)
            self._wait_nodes(1)
            for _ in range(extra_nodes):
                self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], cpus_per_node)
            self._wait_nodes(1 + extra_nodes)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], cpus: int) -> None:
        log = open(Path(self.temp) / f"node{len(self.procs)}.log", "w")
        cmd = [str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus}", "--object-store-memory=200000000",
               f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", "--disable-usage-stats", *args]
        env = {**os.environ, **self.env}
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env=env))

    def node_ids(self) -> list[str]:
        """The alive nodes' ids, asked of the cluster by a separate driver."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **self.env})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}: see {self.temp}/node*.log")
            try:
                if len(self.node_ids()) >= n:
                    return
            except AssertionError:
                pass
            time.sleep(2)
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes in 180 s")

    def descendants(self) -> list[int]:
        """PIDs of every process below the nodes' ``ray start`` processes."""
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [p.pid for p in self.procs]
        while todo:
            pid = todo.pop()
            for c in children.get(pid, []):
                out.append(c)
                todo.append(c)
        return out

    def actor_pids(self) -> list[int]:
        """The embedding actors of this cluster (process title ``ray::MapWorker(MapBatches(EmbedWorker))``)."""
        pids = []
        for pid in self.descendants():
            try:
                if b"MapWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                pass
        return pids

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        subprocess.run(["rm", "-rf", self.temp], check=False)


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(extra_nodes=1, cpus_per_node=1)
    try:
        yield c
    finally:
        c.stop()


def index_cmd(catalogue: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "lookalike"), "index", str(catalogue), "--out", str(out), "--model", "test-tiny", "-q",
            "--json", *extra]


def run_env(commit_every: int | None = None) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("LOOKALIKE_COMMIT_EVERY", None)
    if commit_every:
        env["LOOKALIKE_COMMIT_EVERY"] = str(commit_every)
    return env


def index(catalogue: Path, out: Path, *extra: str, commit_every: int | None = None) -> dict:
    r = subprocess.run(index_cmd(catalogue, out, *extra), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                       env=run_env(commit_every))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def photos(out: Path) -> dict[tuple[str, str], tuple[str, np.ndarray]]:
    """(product id, source) -> (sha256, vector) of every stored photo; fails on a duplicate pair."""
    with closing(sqlite3.connect(out / "catalogue.sqlite")) as db:
        rows = db.execute("SELECT product_id, source, sha256, vector FROM photos").fetchall()
    got = {(p, s): (h, np.frombuffer(v, np.float32)) for p, s, h, v in rows}
    assert len(got) == len(rows), "a photo is stored twice"
    return got


def products(out: Path) -> dict[str, tuple]:
    with closing(sqlite3.connect(out / "catalogue.sqlite")) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, title, category, metadata FROM products")}


def assert_same_index(got: Path, want: Path) -> None:
    """Same products (with their metadata), same photos (with their hashes), vectors' cosines >= 0.999."""
    assert products(got) == products(want)
    a, b = photos(got), photos(want)
    assert a.keys() == b.keys()
    assert all(a[k][0] == b[k][0] for k in a)
    cos = np.array([float(a[k][1] @ b[k][1]) for k in a])
    assert cos.min() >= 0.999, f"lowest cosine {cos.min():.5f}"


def check_clean(out: Path) -> None:
    r = subprocess.run([str(BIN / "lookalike"), "check", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def committed_photos(out: Path) -> int:
    db = out / "catalogue.sqlite"
    if not db.is_file():
        return 0
    try:
        with closing(sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def magento(datasets_dir, tmp_path_factory) -> Path:
    """The Magento catalogue's manifest (scripts/prepare_magento.py): 725 photos of 191 products."""
    out = tmp_path_factory.mktemp("magento") / "magento.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_magento.py"), "--out", str(out),
                    str(datasets_dir / "magento")], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def magento_slice(magento) -> Path:
    out = magento.with_name("slice.jsonl")
    out.write_text("".join(magento.read_text().splitlines(keepends=True)[:SLICE]))
    return out


@pytest.fixture(scope="module")
def local_magento(magento, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "index"
    report = index(magento, out)
    assert report["engine"] == "local" and report["indexed"] == 725
    return out


@pytest.fixture(scope="module")
def ray_magento(magento, cluster, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ray") / "index"
    return out, index(magento, out, "--engine", "ray", "--ray-address", cluster.address)


@pytest.mark.datasets
def test_magento_on_ray_equals_the_local_engine(ray_magento, local_magento):
    out, report = ray_magento
    assert report["engine"] == "ray"
    assert (report["indexed"], report["failed"], report["index_products"]) == (725, 0, 191)
    assert_same_index(out, local_magento)
    check_clean(out)


@pytest.mark.datasets
def test_both_nodes_worked(ray_magento, cluster):
    _, report = ray_magento
    nodes = cluster.node_ids()
    assert len(nodes) == 2
    done = {}
    for w in report["workers"]:
        done[w["node_id"]] = done.get(w["node_id"], 0) + w["photos"]
    assert sorted(done) == nodes and all(n > 0 for n in done.values()), report["workers"]
    assert sum(done.values()) == 725


@pytest.mark.datasets
def test_a_killed_worker_costs_nothing(magento_slice, local_magento, cluster, tmp_path):
    out = tmp_path / "index"
    proc = subprocess.Popen(index_cmd(magento_slice, out, "--engine", "ray", "--ray-address", cluster.address,
                                      "--batch-size", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(commit_every=16))
    killed = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            actors = cluster.actor_pids()
            committed = committed_photos(out)
            if actors and committed > 0:
                killed = actors[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "the run ended before a worker could be killed: " + stderr[-2000:]
    assert 0 < committed < SLICE  # killed mid-run
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert (report["indexed"], report["failed"]) == (SLICE, 0)
    assert sum(w["photos"] for w in report["workers"]) == SLICE  # each photo's result taken once
    stored = photos(out)
    assert len(stored) == SLICE
    want = photos(local_magento)
    assert all(float(v @ want[k][1]) >= 0.999 and h == want[k][0] for k, (h, v) in stored.items())
    check_clean(out)


@pytest.mark.datasets
def test_a_killed_driver_resumes(magento_slice, cluster, tmp_path):
    clean = tmp_path / "clean"
    index(magento_slice, clean, "--engine", "ray", "--ray-address", cluster.address, "--batch-size", "8")
    out = tmp_path / "index"
    proc = subprocess.Popen(index_cmd(magento_slice, out, "--engine", "ray", "--ray-address", cluster.address,
                                      "--batch-size", "8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=run_env(commit_every=16))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while committed_photos(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the driver ended before the kill: " + stderr[-2000:]
    before = committed_photos(out)
    assert 0 < before < SLICE
    report = index(magento_slice, out, "--engine", "ray", "--ray-address", cluster.address, "--batch-size", "8")
    assert report["indexed"] + report["unchanged"] == SLICE and report["failed"] == 0
    assert report["unchanged"] >= before  # what the killed run committed was not embedded again
    assert_same_index(out, clean)
    check_clean(out)


@pytest.mark.datasets
def test_bad_files_are_reported_as_on_the_local_engine(datasets_dir, tmp_path):
    messy = datasets_dir / "messy-images"
    local = index(messy, tmp_path / "local")
    out = tmp_path / "ray"
    report = index(messy, out, "--engine", "ray", "--ray-address", "local", "--ray-workers", "2")
    assert report["failed"] == local["failed"] > 0 and report["indexed"] == local["indexed"] > 0
    key = lambda f: (f["id"], f["image"], f["reason"])  # noqa: E731
    assert sorted(map(key, report["failures"])) == sorted(map(key, local["failures"]))
    assert report["row_problems"] == local["row_problems"]
    assert_same_index(out, tmp_path / "local")


# Runs `lookalike index` in a fresh interpreter, then says whether Ray was imported on the way.
INDEX_AND_REPORT_RAY = """
import sys
from indexer.cli import main
code = main(sys.argv[1:])
print("ray imported" if "ray" in sys.modules else "ray not imported")
sys.exit(code)
"""


def two_photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (48, 40), colour).save(folder / f"p{i}.png")
    return folder


def test_the_local_engine_never_imports_ray(tmp_path):
    photos = two_photos(tmp_path / "photos")
    r = subprocess.run([sys.executable, "-c", INDEX_AND_REPORT_RAY, "index", str(photos), "--out", str(tmp_path / "i"),
                        "--model", "test-tiny", "--workers", "0", "-q"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=run_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "ray not imported"


def test_an_unreachable_cluster_is_one_clear_error(tmp_path):
    r = subprocess.run(index_cmd(two_photos(tmp_path / "photos"), tmp_path / "i", "--engine", "ray", "--ray-address",
                                 f"127.0.0.1:{_free_port()}"),
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=run_env())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("lookalike: error: cannot connect to Ray at")
    assert "Traceback" not in r.stderr


def test_a_cluster_that_refuses_the_token_is_one_clear_error(tmp_path):
    """Ray 2.60's token authentication: a head started with RAY_AUTH_MODE=token refuses a driver without
    it; the error says so (not "no head node there") and how to fix it."""
    token = os.urandom(32).hex()  # the head's own token: ~/.ray/auth_token is left alone
    head = RayCluster(extra_nodes=0, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        env = run_env()  # RAY_AUTH_MODE=disabled
        env.pop("RAY_AUTH_TOKEN", None)
        r = subprocess.run(index_cmd(two_photos(tmp_path / "photos"), tmp_path / "i", "--engine", "ray",
                                     "--ray-address", head.address),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    finally:
        head.stop()
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lookalike: error: cannot connect to Ray at {head.address!r}: the cluster refused"), last
    assert "RAY_AUTH_MODE" in last and "Traceback" not in r.stderr


@pytest.mark.datasets
def test_bench_ray_short_mode(datasets_dir):
    """scripts/bench_ray.py on 64 Magento photos: both engines index them alike, and the driver's figures
    and the N-node table come out (speed itself is never asserted)."""
    from test_benchmarks import _run

    r = _run("bench_ray.py", "--images", "64", "--commit-vectors", "3000", "--catalogue-rows", "3000")
    assert r["images"] == 64 and r["mean_cosine"] >= 0.999
    assert sum(w["photos"] for w in r["ray_workers_detail"]) == 64
    for key in ("local_images_per_s", "ray_images_per_s", "commit_vectors_per_s", "catalogue_rows_per_s"):
        assert r[key] > 0, key
    assert [row["nodes"] for row in r["scaling"]] == [1, 2, 4, 8, 16, 32, 64]


def test_gpu_check_says_when_there_is_no_gpu():
    """scripts/gpu_check_ray.py: without a GPU, exit 2 and one line saying so; with one, a real run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check_ray import gpu_utilisation

    if gpu_utilisation():
        from test_benchmarks import _run

        r = _run("gpu_check_ray.py", "--images", "256")
        assert r["images"] == 256 and r["gpu_util_pct"] and r["images_per_s_per_gpu"] > 0
        return
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_ray.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no NVIDIA GPU found")
