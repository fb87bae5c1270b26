"""Hostile catalogues through a whole indexing run: one bad file or row never stops it.

A folder of photos (a JPEG of the generated fixture catalogue, turned and re-encoded so each
photo has its own bytes) with files whose names are not UTF-8, and manifests with lone surrogates
and NULs, are indexed with the tiny model, once through index_catalogue with small commit
batches (the bad file used to crash the run at the commit that held it, and every re-run at
the same point) and once through the real `lookalike index` command.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from indexer.catalogue import read_catalogue
from indexer.pipeline import index_catalogue
from indexer.store import Store

N_PHOTOS = 40
COMMIT_EVERY = 8


@pytest.fixture(scope="module")
def photo_bytes(fixture_data) -> list[bytes]:
    """N_PHOTOS distinct small JPEGs."""
    with Image.open(fixture_data.orientation / "card.jpg") as im:
        base = im.convert("RGB").resize((48, 48))
    out = []
    for i in range(N_PHOTOS):
        buf = io.BytesIO()
        base.rotate(i * 9).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _hostile_folder(root: Path, photo_bytes: list[bytes]) -> Path:
    root.mkdir()
    broot = os.fsencode(root)
    for i, data in enumerate(photo_bytes):
        (root / f"p{i:03d}.jpg").write_bytes(data)
    # in the middle of the sorted names, so that it falls inside a commit batch
    with open(os.path.join(broot, b"p010\xff.jpg"), "wb") as f:
        f.write(photo_bytes[0])
    with open(os.path.join(broot, b"p020\nx.jpg"), "wb") as f:
        f.write(photo_bytes[1])
    (root / "README.txt").write_text("photos of the shop\n")
    os.mkfifo(root / "p030.jpg.part")
    (root / "gone.jpg").symlink_to(root / "deleted.jpg")
    return root


EXPECTED_SKIPS = {
    "p010\\xff.jpg": "bad_name",
    "p020\\nx.jpg": "bad_name",
    "README.txt": "not_an_image",
    "p030.jpg.part": "not_a_file",
    "gone.jpg": "broken_link",
}


@pytest.mark.integration
def test_a_folder_with_bad_names_is_indexed_in_full_and_re_runs(tmp_path: Path, photo_bytes, tiny_model):
    root = _hostile_folder(tmp_path / "shop", photo_bytes)
    catalogue = read_catalogue(root)
    with Store.create(tmp_path / "idx", tiny_model.identity) as store:
        report = index_catalogue(catalogue, store, tiny_model, workers=0, batch_size=5,
                                 commit_every=COMMIT_EVERY, progress=False)
        assert (report.indexed, report.failed) == (N_PHOTOS, 0)
        assert {p["where"]: p["reason"] for p in report.row_problems} == EXPECTED_SKIPS
        assert store.check()["ok"] and store.count_photos() == N_PHOTOS
        again = index_catalogue(catalogue, store, tiny_model, workers=0, commit_every=COMMIT_EVERY, progress=False)
        assert (again.indexed, again.unchanged, again.failed) == (0, N_PHOTOS, 0)
    saved = json.loads((tmp_path / "idx" / "report.json").read_text(encoding="utf-8"))
    assert {p["where"]: p["reason"] for p in saved["row_problems"]} == EXPECTED_SKIPS
    assert all(p["message"] for p in saved["row_problems"])


@pytest.mark.integration
def test_manifest_rows_with_surrogates_and_nuls_cost_their_row(tmp_path: Path, photo_bytes, tiny_model):
    for i in range(4):
        (tmp_path / f"p{i}.jpg").write_bytes(photo_bytes[i])
    lines = [
        '{"id": "a", "image": "p0.jpg", "title": "Alpha"}',
        '{"id": "b", "image": "p1.jpg", "title": "smile \\ud83d"}',
        '{"id": "c", "image": "p2.jpg", "title": "Gamma", "brand": "x\\u0000y"}',
        '{"id": "d", "image": "p3.jpg", "title": "Delta \\ud83d\\ude00"}',  # a valid surrogate pair
    ]
    manifest = tmp_path / "cat.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    catalogue = read_catalogue(manifest)
    with Store.create(tmp_path / "idx", tiny_model.identity) as store:
        report = index_catalogue(catalogue, store, tiny_model, workers=0, commit_every=1, progress=False)
        assert (report.indexed, report.failed) == (2, 0)
        assert [(p["where"], p["reason"], p["id"]) for p in report.row_problems] == [
            ("cat.jsonl:2", "bad_text", "b"), ("cat.jsonl:3", "bad_text", "c")]
        assert store.get_product("d")["title"] == "Delta \U0001F600"
    assert "\\ud83d" in report.summary()


def _lookalike(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lookalike", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, LOOKALIKE_COMMIT_EVERY=str(COMMIT_EVERY)))


@pytest.mark.system
def test_lookalike_index_on_a_hostile_folder(tmp_path: Path, photo_bytes):
    root = _hostile_folder(tmp_path / "shop", photo_bytes)
    out = tmp_path / "idx"
    r = _lookalike("index", str(root), "--out", str(out), "--model", "test-tiny", "-q", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"indexed {N_PHOTOS} photos" in r.stdout and f"{len(EXPECTED_SKIPS)} catalogue rows or files skipped" in r.stdout
    for where, reason in EXPECTED_SKIPS.items():
        assert f"skipped {where}: {reason}:" in r.stdout
    r = _lookalike("index", str(root), "--out", str(out), "--model", "test-tiny", "-q", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["indexed"], report["unchanged"]) == (0, N_PHOTOS)


@pytest.mark.system
def test_lookalike_index_on_a_folder_of_no_photos_says_so(tmp_path: Path):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "README.txt").write_text("nothing here")
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as f:
        f.write(b"\xff\xd8")
    r = _lookalike("index", str(root), "--out", str(tmp_path / "idx"), "--model", "test-tiny", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no photos found" in r.stderr and "bad\\xff.jpg" in r.stderr and "README.txt" in r.stderr
