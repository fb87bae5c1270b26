"""Crash safety of ``lookalike index``, proven with SIGKILL.

A catalogue of 120 photos (the generated fixture catalogue's, enlarged to the size of real
product photos so that decoding costs what it does in a shop) is indexed once without interruption (the
reference). Then ``lookalike index`` runs again and again into one directory and is
killed with SIGKILL: while the model loads, in a fresh store just after its first
commit, in a re-opened store soon after the run took the index lock, between
commits, and around the last commits and the final save. Commits come every 16
photos (``LOOKALIKE_COMMIT_EVERY``), so kills land between them. After every kill
the directory is copied as the kill left it; the copies are checked for what a
crash may and may not leave, and a last uninterrupted run must end with exactly
the reference's products, photos and vectors.

A kill point is an event seen from outside (the run holds the index lock, a commit
appeared) plus a seeded random fraction of the time between the run's commits, so
kills land where they are meant to on a fast machine and on a loaded one alike;
``LOOKALIKE_CRASH_SEED`` moves them. Linux only (``/proc/locks``), as is lookalike.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from indexer import cli
from indexer.store import Store

pytestmark = pytest.mark.system

LOOKALIKE = Path(sys.executable).with_name("lookalike")
N_PHOTOS = 120
COMMIT_EVERY = 16
SEED = int(os.environ.get("LOOKALIKE_CRASH_SEED", "20240611"))  # another seed moves the kill points
# what `check` may still report as a problem right after a kill: a manifest not yet written
# (killed inside Store.create, before its first save); a lagging snapshot or manifest is only a note
REPAIRABLE = (re.compile(r"^manifest unreadable: \[Errno 2\]"),)
WINDOW_S = 240  # no run may take longer than this, however loaded the machine


def index_command(catalogue: Path, out: Path) -> list[str]:
    return [str(LOOKALIKE), "index", str(catalogue), "--out", str(out), "--model", "test-tiny", "-q",
            "--workers", "0", "--batch-size", "8"]


def run_env(commit_every: int | None) -> dict:
    env = dict(os.environ)
    env.pop("LOOKALIKE_COMMIT_EVERY", None)
    if commit_every:
        env["LOOKALIKE_COMMIT_EVERY"] = str(commit_every)
    return env


def store_state(out: Path) -> tuple[int, int] | None:
    """(generation, photos) committed in ``out``, read like any reader would; None before the store exists."""
    db = out / "catalogue.sqlite"
    if not db.is_file():
        return None
    try:
        with closing(sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)) as conn:
            gen = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            photos = conn.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
    except sqlite3.Error:
        return None
    return (int(gen[0]), photos) if gen else None


def holds_index_lock(out: Path, pid: int) -> bool:
    """Whether process ``pid`` holds the writer's flock on ``out/.lock`` (Store.create/open got that far)."""
    try:
        inode = os.stat(out / ".lock").st_ino
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[4] == str(pid) and fields[5].split(":")[-1] == str(inode):
            return True
    return False


def run_cli(*args: str) -> tuple[int, str]:
    """Run the ``lookalike`` entry point in this process; (exit status, stdout and stderr)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = cli.main(list(args))
    return rc, buf.getvalue()


def photo_table(index: Path) -> dict[tuple[str, str], tuple[np.ndarray, dict, dict]]:
    """(product id, photo source) -> (vector, photo metadata, product fields) of every stored photo."""
    out = {}
    with Store.open(index) as store:
        for pid in store.product_ids():
            p = store.get_product(pid)
            product = {k: p[k] for k in ("title", "category", "metadata")}
            for im, vec in zip(p["images"], store.product_vectors(pid)):
                out[(pid, im["image"])] = (vec, im["metadata"], product)
    return out


@dataclass
class Kill:
    """One SIGKILL: when it came, what the run had done, and a copy of the directory as it was left."""

    name: str
    after_s: float
    returncode: int
    state: tuple[int, int] | None  # (generation, photos) committed, None: no store yet
    snapshot_current: bool  # a FAISS snapshot of the committed generation was on disk
    copy: Path | None
    hit: str = ""
    check_rc: int | None = None  # `lookalike check` on the directory right after the kill
    check_out: str = ""


class RunWatch:
    """Follows one indexing run from outside, as a reader would: when it took the index lock, when
    each of its commits appeared. ``interval`` is the time between the last two of those events."""

    def __init__(self, out: Path, proc: subprocess.Popen, before: tuple[int, int] | None):
        self.out, self.proc = out, proc
        self.start_generation = before[0] if before else 0
        self.locked = False
        self.commits = 0  # commits this run made so far
        self.photos = before[1] if before else 0
        self.marks: list[float] = []  # lock taken, then each commit

    def poll(self) -> None:
        if not self.locked and holds_index_lock(self.out, self.proc.pid):
            self.locked = True
            self.marks.append(time.monotonic())
        state = store_state(self.out)
        if state is not None and state[0] - self.start_generation > self.commits:
            self.commits, self.photos = state[0] - self.start_generation, state[1]
            self.marks.append(time.monotonic())

    @property
    def interval(self) -> float | None:
        return self.marks[-1] - self.marks[-2] if len(self.marks) >= 2 else None


def _kill_when(watch: RunWatch, until, delay) -> float:
    """Poll ``watch`` until ``until(watch)``, wait ``delay(watch)`` seconds, SIGKILL the run.

    Returns seconds from the start to the kill. Fails if the run ends before its kill point."""
    proc, t0 = watch.proc, time.monotonic()
    while True:
        watch.poll()
        if until(watch):
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before its kill point")
        if time.monotonic() - t0 > WINDOW_S:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.005)
    time.sleep(delay(watch))
    if proc.poll() is not None:
        pytest.fail(f"the run ended (status {proc.returncode}) before its kill point")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - t0


def _describe(kill: Kill) -> str:
    if kill.state is None:
        return "before the store existed (imports / model loading)"
    gen, photos = kill.state
    if not kill.snapshot_current:
        return f"between commits: generation {gen}, {photos} photos committed, snapshot not yet written"
    if photos == N_PHOTOS:
        return f"after the final save: generation {gen}, all {photos} photos"
    return f"at a saved generation: generation {gen}, {photos} photos"


@pytest.fixture(scope="module")
def catalogue(fixture_data, tmp_path_factory) -> Path:
    """N_PHOTOS photos of about 1000x1200 px (Magento's size): the fixture's photos, then mirrored
    copies of them as the photos of further products ("<id>-M")."""
    from PIL import Image

    from indexer.images import open_image

    rows = fixture_data.rows()
    tmp = tmp_path_factory.mktemp("crash")
    out = []
    for i in range(N_PHOTOS):
        row = rows[i % len(rows)]
        im = open_image(row["image"]).resize((1000, 1200), Image.Resampling.BILINEAR)
        if i >= len(rows):
            im, row = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dict(row, id=row["id"] + "-M")
        path = tmp / f"{i:03d}.jpg"
        im.save(path, "JPEG", quality=90)
        out.append(json.dumps(dict(row, image=str(path))))
    assert len(out) == N_PHOTOS
    path = tmp / "catalogue.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def campaign(catalogue: Path, tmp_path_factory):
    """The reference run, and a series of SIGKILLed runs into one directory ended by a full run.

    Returns (reference dir, killed-into dir, [Kill]).
    """
    tmp = tmp_path_factory.mktemp("kills")
    ref, out = tmp / "reference", tmp / "index"
    # The reference commits once (the default 1024): the result must not depend on commit size.
    reference = subprocess.Popen(index_command(catalogue, ref), env=run_env(None),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rng = random.Random(SEED)
    env = run_env(COMMIT_EVERY)
    kills: list[Kill] = []

    last_interval = [0.5]  # seconds between commits, as last measured

    def kill_run(name: str, until, delay) -> None:
        before = store_state(out)
        proc = subprocess.Popen(index_command(catalogue, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        watch = RunWatch(out, proc, before)
        after = _kill_when(watch, until, delay)
        if watch.interval is not None and watch.commits:
            last_interval[0] = watch.interval
        state = store_state(out)
        snapshot = state is not None and (out / f"vectors.g{state[0]}.faiss").is_file()
        copy = None
        if out.exists():
            copy = tmp / f"after-kill-{len(kills) + 1}"
            shutil.copytree(out, copy)
        kill = Kill(name, round(after, 2), proc.returncode, state, snapshot, copy)
        kill.hit = _describe(kill)
        kill.check_rc, kill.check_out = run_cli("check", str(copy or out))
        kills.append(kill)

    u = [rng.random() for _ in range(5)]
    kill_run("while the model loads", lambda w: True, lambda w: 0.2 + 0.8 * u[0])
    kill_run("fresh store, just after its first commit", lambda w: w.commits >= 1, lambda w: 0.5 * u[1] * w.interval)
    kill_run("re-opened store, soon after it took the lock", lambda w: w.locked,
             lambda w: 0.5 * u[2] * last_interval[0])
    kill_run("between commits", lambda w: w.commits >= 2, lambda w: (0.1 + 0.8 * u[3]) * w.interval)
    # the last commit of 16 photos, then 8 more, the final commit and the snapshot: kill around those
    kill_run("around the last commits", lambda w: w.photos >= N_PHOTOS - N_PHOTOS % COMMIT_EVERY and w.commits >= 1,
             lambda w: 0.6 * u[4] * w.interval)

    final = subprocess.run(index_command(catalogue, out), env=env, capture_output=True, text=True, timeout=WINDOW_S)
    assert final.returncode == 0, final.stdout + final.stderr
    stdout, _ = reference.communicate(timeout=WINDOW_S)
    assert reference.returncode == 0, stdout
    print("\nkill points (seed %d):" % SEED)
    for k in kills:
        print(f"  {k.name:<48} killed after {k.after_s:5.2f} s: {k.hit}")
        print(f"    lookalike check -> exit {k.check_rc}: " + k.check_out.strip().replace("\n", "\n    "))
    return ref, out, kills


# --------------------------------------------------------------------------- the tests


def test_every_kill_interrupted_a_running_index(campaign):
    _, _, kills = campaign
    assert len(kills) == 5
    assert all(k.returncode == -signal.SIGKILL for k in kills)
    # kills must have landed between commits at least once, or this file tests nothing
    assert any(k.state and not k.snapshot_current and 0 < k.state[1] < N_PHOTOS for k in kills), [k.hit for k in kills]
    # generations only grow from kill to kill: no committed work was lost
    photos = [k.state[1] for k in kills if k.state]
    assert photos == sorted(photos) and photos[-1] > 0


def test_a_kill_leaves_only_whole_commits_of_correct_photos(campaign):
    ref, _, kills = campaign
    reference = photo_table(ref)
    for k in kills:
        if k.state is None:
            # killed before the store existed: `check` says so in one line, the next run starts afresh
            assert k.check_rc == 2 and "is not a lookalike index" in k.check_out and "Traceback" not in k.check_out
            continue
        gen, photos = k.state
        # photos arrive 16 at a time, then the rest at the end: never part of a commit
        assert photos % COMMIT_EVERY == 0 or photos == N_PHOTOS, k
        table = photo_table(k.copy)
        assert len(table) == photos
        for key, (vec, meta, product) in table.items():
            rvec, rmeta, rproduct = reference[key]
            np.testing.assert_allclose(vec, rvec, atol=1e-5, err_msg=f"{k.name}: {key}")
            assert (meta, product) == (rmeta, rproduct), key
        # a reader (the server) gets a working index at once: searching a committed vector finds it
        with Store.open(k.copy) as store:
            assert store.count_photos() == photos
            if photos:
                query = table[sorted(table)[photos // 2]][0]
                hit = store.search(query[None, :], k=1)[0][0]
                same = {key for key, (vec, _, _) in table.items() if np.allclose(vec, query, atol=1e-6)}
                assert (hit.product_id, hit.source) in same and hit.score > 0.9999  # (some photos are shared)
            result = store.check()
        # the committed state itself is sound; at most the snapshot or manifest lags behind it
        others = [p for p in result["problems"] if not any(r.match(p) for r in REPAIRABLE)]
        assert others == [], (k.name, result["problems"])


def test_the_next_writable_open_repairs_what_a_kill_left(campaign, tmp_path):
    _, _, kills = campaign
    repaired = 0
    for k in kills:
        if k.state is None:
            continue
        path = shutil.copytree(k.copy, tmp_path / k.copy.name)
        with Store.open(path, writable=True) as store:
            assert store.generation() == k.state[0]
        rc, out = run_cli("check", str(path))
        assert rc == 0 and ": consistent:" in out, (k.name, out)
        assert (path / f"vectors.g{k.state[0]}.faiss").is_file()
        assert json.loads((path / "manifest.json").read_text())["generation"] == k.state[0]
        repaired += not k.snapshot_current
    assert repaired >= 1


def test_check_right_after_a_kill_between_commits_says_consistent(campaign):
    _, _, kills = campaign
    for k in kills:
        if k.state is not None and not k.snapshot_current:
            assert k.check_rc == 0 and ": consistent:" in k.check_out, k.check_out


def test_rerun_after_the_kills_matches_the_reference(campaign):
    ref, out, _ = campaign
    reference, resumed = photo_table(ref), photo_table(out)
    assert len(reference) == N_PHOTOS
    assert resumed.keys() == reference.keys()
    for key, (vec, meta, product) in resumed.items():
        rvec, rmeta, rproduct = reference[key]
        np.testing.assert_allclose(vec, rvec, atol=1e-5, err_msg=str(key))
        assert (meta, product) == (rmeta, rproduct), key
    with Store.open(ref) as a, Store.open(out) as b:
        assert a.product_ids() == b.product_ids()
        assert (b.count_products(), b.count_photos()) == (a.count_products(), a.count_photos())
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 0 and report["indexed"] + report["unchanged"] == N_PHOTOS
    assert report["unchanged"] > 0  # it resumed: what the killed runs committed was not embedded again
    check = subprocess.run([str(LOOKALIKE), "check", str(out)], capture_output=True, text=True, timeout=WINDOW_S)
    assert check.returncode == 0 and ": consistent:" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_commit_every_is_a_clear_error(catalogue, tmp_path, tiny_model, monkeypatch, value):
    from indexer.catalogue import read_catalogue
    from indexer.errors import LookalikeError
    from indexer.pipeline import index_catalogue

    monkeypatch.setenv("LOOKALIKE_COMMIT_EVERY", value)
    with Store.create(tmp_path / "idx", tiny_model.identity) as store:
        with pytest.raises(LookalikeError, match=f"LOOKALIKE_COMMIT_EVERY='{value}': give a whole number"):
            index_catalogue(read_catalogue(catalogue), store, tiny_model, workers=0, progress=False)
        assert (store.generation(), store.count_photos()) == (0, 0)


# --------------------------------------------------------------------------- a kill inside Store.create

_KILL_INSIDE_CREATE = """
import os, signal, sqlite3, sys

connect = sqlite3.connect
inserts = 0

def traced(*args, **kwargs):
    conn = connect(*args, **kwargs)
    def trace(sql):
        global inserts
        if sql.startswith("INSERT OR REPLACE INTO meta"):
            inserts += 1
            if inserts == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)
    conn.set_trace_callback(trace)
    return conn

sqlite3.connect = traced
from indexer.model import load_model
from indexer.store import Store
Store.create(sys.argv[1], load_model("test-tiny", None, "cpu").identity)
"""


def test_a_kill_inside_store_create_leaves_no_broken_index(tmp_path, tiny_model):
    script = tmp_path / "kill_inside_create.py"
    script.write_text(_KILL_INSIDE_CREATE)
    # the kill comes just before the second meta row (the model identity) is written
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "idx"), "2"], capture_output=True, text=True,
                          timeout=WINDOW_S, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "idx" / "catalogue.sqlite").is_file()
    # "a crash at any moment leaves the old or the new state": the old state here is no index
    with Store.create(tmp_path / "idx", tiny_model.identity) as store:
        assert store.check()["ok"]
