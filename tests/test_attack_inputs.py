"""Hostile and careless input found by an attack on 2026-12-01, sent to the real CLI and a real
``lookalike serve`` process: a small JPEG of thousands of scans (CPU, not memory), a catalogue row
naming a FIFO, tar shards with deeply nested or huge JSON and a flood of members, file-system
errors, bad ports, label templates with stray braces, an index manifest of the wrong shape, product
ids a browser cannot address, duplicate form fields and CSV columns. Each ends in a clear one-line
message or a 4xx JSON error, and bounded work."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from conftest import served
from PIL import Image

from indexer.catalogue_shards import read_shards
from indexer.image_headers import MAX_JPEG_SCANS, jpeg_scans
from indexer.images import ImageError, open_image

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
KEY = "attack-inputs-key"


def _run(*args, timeout=120):
    return subprocess.run([LOOKALIKE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _one_line_error(r) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("lookalike: error: "), r.stderr


def scan_bomb(width: int = 2048, height: int = 2048, scans: int = 2000) -> bytes:
    """A greyscale progressive JPEG whose one AC scan (about 30 bytes: end-of-band runs) is repeated
    ``scans`` times; each repeat makes the decoder visit every 8x8 block of the image again."""
    def seg(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    def pack(bits: list[int]) -> bytes:
        bits = bits + [1] * (-len(bits) % 8)
        out = bytearray()
        for i in range(0, len(bits), 8):
            b = int("".join(map(str, bits[i:i + 8])), 2)
            out += bytes([b, 0]) if b == 0xFF else bytes([b])
        return bytes(out)

    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    j = b"\xff\xd8" + seg(0xDB, b"\x00" + bytes([1] * 64))
    j += seg(0xC2, b"\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00")
    j += seg(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC: one code, category 0
    j += seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0")  # AC: one code, an end-of-band run of 2^14
    j += seg(0xDA, b"\x01\x01\x00\x00\x00\x00") + pack([0] * blocks)
    bits, left = [], blocks
    while left > 0:
        run = min(left, 32767)
        bits += [0] + [int(c) for c in format(run - 16384 if run >= 16384 else 0, "014b")]
        left -= max(run, 16384)
    j += (seg(0xDA, b"\x01\x01\x00\x01\x3f\x00") + pack(bits)) * scans
    return j + b"\xff\xd9"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    bomb = scan_bomb()
    assert len(bomb) < 100_000 and jpeg_scans(io.BytesIO(bomb)) > MAX_JPEG_SCANS
    with pytest.raises(ImageError) as e:
        open_image(bomb)
    assert e.value.reason == "decompression_bomb" and "scans" in str(e.value)
    # the same construction with a normal number of scans decodes, and so does a real progressive JPEG
    assert open_image(scan_bomb(64, 64, scans=10)).size == (64, 64)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 200)).save(buf, "JPEG", progressive=True, quality=90)
    assert 2 <= jpeg_scans(io.BytesIO(buf.getvalue())) <= 12
    assert open_image(buf.getvalue()).size == (300, 200)


@pytest.fixture(scope="module")
def server(fixture_index, tmp_path_factory):
    import shutil

    index = tmp_path_factory.mktemp("attack-inputs") / "index"
    shutil.copytree(fixture_index, index)
    with served(index, {"LOOKALIKE_API_KEYS": KEY, "LOOKALIKE_ACCESS_LOG": "false"}) as base:
        yield base


def test_the_scan_bomb_gets_a_4xx_from_every_upload_route(server):
    bomb = scan_bomb()
    r = httpx.post(server + "/v1/search/image", files={"image": ("b.jpg", bomb, "image/jpeg")}, timeout=60)
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "decompression_bomb", r.text
    r = httpx.post(server + "/v1/labels", files={"image": ("b.jpg", bomb, "image/jpeg")}, timeout=60)
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "decompression_bomb", r.text
    r = httpx.post(server + "/v1/products", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   data={"metadata": json.dumps({"id": "bomb"})}, files={"images": ("b.jpg", bomb, "image/jpeg")})
    assert 400 <= r.status_code < 500, r.text
    assert httpx.get(server + "/v1/products/bomb", timeout=10).status_code == 404  # nothing was stored


def test_two_metadata_fields_and_unusable_label_lists_get_a_422(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/products", headers=auth, timeout=60,
                   data={"metadata": [json.dumps({"id": "m1"}), json.dumps({"id": "m2"})]})
    assert r.status_code == 422 and "metadata" in r.json()["error"]["message"], r.text
    assert httpx.get(server + "/v1/products/m2", timeout=10).status_code == 404
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 40)).save(photo, "JPEG")
    for labels in (",,,", "hoodie,a\x00b"):
        r = httpx.post(server + "/v1/labels", data={"labels": labels}, timeout=60,
                       files={"image": ("q.jpg", photo.getvalue(), "image/jpeg")})
        assert r.status_code == 422 and r.json()["error"]["code"] in ("bad_labels", "bad_query"), (labels, r.text)


@pytest.mark.parametrize("pid", [".", ".."])
def test_ids_a_browser_resolves_away_are_refused(server, pid, tmp_path):
    r = httpx.post(server + "/v1/products", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   data={"metadata": json.dumps({"id": pid})})
    assert r.status_code == 422, r.text
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 64), (20, 30, 240)).save(photo)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": pid, "image": str(photo)}) + "\n"
                                      + json.dumps({"id": "fine", "image": str(photo)}) + "\n")
    r = _run("index", tmp_path / "m.jsonl", "--out", tmp_path / "index", "--model", "test-tiny", "--json", "-q")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and report["index_products"] == 1, (r.stdout, r.stderr)
    assert any(p["reason"] == "bad_id" for p in report["row_problems"]), report["row_problems"]


def test_a_catalogue_row_naming_a_fifo_fails_that_row_and_finishes(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    photo = tmp_path / "ok.jpg"
    Image.new("RGB", (64, 64), (20, 130, 40)).save(photo)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "f", "image": "fifo"}) + "\n"
                                      + json.dumps({"id": "d", "image": "/dev/zero"}) + "\n"
                                      + json.dumps({"id": "ok", "image": "ok.jpg"}) + "\n")
    r = _run("index", tmp_path / "m.jsonl", "--out", tmp_path / "index", "--model", "test-tiny", "--json", "-q",
             "--allow-outside-root", "--max-failed-fraction", "0.9", timeout=120)  # a FIFO read would wait for ever
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["indexed"] == 1 and report["failed"] == 2, report
    assert all("not a regular file" in f["message"] for f in report["failures"]), report["failures"]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_shards_with_hostile_json_or_too_many_members(tmp_path, monkeypatch):
    photo = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(photo, "JPEG")
    jpg = photo.getvalue()
    shard = _tar(tmp_path / "a.tar", {
        "deep.jpg": jpg, "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "huge.jpg": jpg, "huge.json": b'{"title": "' + b" " * (2 << 20) + b'"}',
        "fine.jpg": jpg, "fine.json": b'{"title": "Fine"}'})
    cat = read_shards([shard])
    reasons = {p.where.split(":")[-1]: (p.reason, p.message) for p in cat.problems}
    assert reasons["deep"][0] == "bad_json" and "nested too deeply" in reasons["deep"][1]
    assert reasons["huge"][0] == "bad_json" and "bytes of metadata" in reasons["huge"][1]
    assert cat.products["fine"]["title"] == "Fine" and len(cat.rows) == 3  # the photos are still indexed

    import indexer.catalogue_shards as shards

    monkeypatch.setattr(shards, "MAX_SHARD_MEMBERS", 10)
    cat = read_shards([_tar(tmp_path / "many.tar", {f"{i}.txt": b"x" for i in range(11)})])
    assert [p.reason for p in cat.problems] == ["bad_shard"] and "more than 10 members" in cat.problems[0].message


def test_file_system_errors_and_bad_arguments_are_one_line(tmp_path):
    (tmp_path / "shop").mkdir()
    photo = tmp_path / "shop" / "p.jpg"
    Image.new("RGB", (64, 64), (20, 30, 240)).save(photo)
    (tmp_path / "a-file").write_text("not a folder")
    _one_line_error(_run("index", tmp_path / "shop", "--out", tmp_path / "a-file", "--model", "test-tiny"))
    _one_line_error(_run("index", tmp_path / "shop", "--out", "/proc/lookalike-index", "--model", "test-tiny"))
    (tmp_path / "other").mkdir()
    for wrong in ("[]", '{"model": 3}'):
        (tmp_path / "other" / "manifest.json").write_text(wrong)
        r = _run("index", tmp_path / "shop", "--out", tmp_path / "other", "--model", "test-tiny")
        _one_line_error(r)
        assert "not a lookalike index manifest" in r.stderr
    r = _run("serve", tmp_path / "other", "--port", "99999")
    assert r.returncode == 2 and "a port is from 0 to 65535" in r.stderr
    (tmp_path / "dup.csv").write_text(f"id,image,id\na,{photo},b\n")
    r = _run("index", tmp_path / "dup.csv", "--out", tmp_path / "dup", "--model", "test-tiny")
    _one_line_error(r)
    assert "'id' more than once" in r.stderr


def test_an_index_folder_that_cannot_be_written(tmp_path, monkeypatch, fixture_index):
    """A read-only file system: the lock cannot be created. The CLI says so in one line; opened
    read-only the index still serves searches (the server's fallback, as for a locked index)."""
    import errno
    import shutil

    from indexer.store import IndexLocked, IndexNotWritable, Store

    index = tmp_path / "index"
    shutil.copytree(fixture_index, index)
    real_open = os.open

    def read_only_fs(path, flags, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_fs)
    with pytest.raises(IndexNotWritable, match="Read-only file system") as e:
        Store.open(index, writable=True)
    assert isinstance(e.value, IndexLocked)  # the server serves it read-only, as a locked index
    with Store.open(index) as store:
        assert store.count_products() > 0


def test_delete_is_all_or_nothing(index_copy):
    from indexer.store import Store

    with Store.open(index_copy) as store:
        ids = sorted(pid for pid, _ in store.iter_products())[:2]
    r = _run("delete", index_copy, ids[0], "no-such-product", ids[1])
    _one_line_error(r)
    assert "'no-such-product'" in r.stderr and "nothing was deleted" in r.stderr
    with Store.open(index_copy) as store:
        assert store.has_product(ids[0]) and store.has_product(ids[1])
    r = _run("delete", index_copy, ids[0], ids[0])
    assert r.returncode == 0 and r.stdout.strip() == "deleted 1 product", (r.stdout, r.stderr)


def test_folder_per_product_layout_keeps_every_photo(tmp_path):
    """``SKU/image.jpg``: the id without the extension would end like the ``/image`` route, so such
    photos keep their extension in the id instead of being skipped."""
    for sku, colour in (("SKU1", (200, 0, 0)), ("SKU2", (0, 200, 0))):
        (tmp_path / "shop" / sku).mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(tmp_path / "shop" / sku / "image.jpg")
        Image.new("RGB", (64, 64), colour[::-1]).save(tmp_path / "shop" / sku / "similar.png")
    r = _run("index", tmp_path / "shop", "--out", tmp_path / "index", "--model", "test-tiny", "--json", "-q")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and report["indexed"] == 4 and not report["row_problems"], report
    from indexer.store import Store

    with Store.open(tmp_path / "index") as store:
        assert store.has_product("SKU1/image.jpg") and store.has_product("SKU2/similar.png")
