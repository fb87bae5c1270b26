"""Hostile catalogue input: every file or row that cannot be used is reported with a reason, the rest read.

Folders: formats Pillow reads whatever their extension, non-image files, symbolic links
(out of the root, broken, looping), FIFOs, sockets, unreadable files, file names that are
not UTF-8 or hold control characters. Manifests: lone surrogates, NULs and control
characters in ids, titles and metadata; bytes that are not UTF-8; fields over the CSV
module's size limit; JSON nested too deeply. The photo is a JPEG of the generated fixture catalogue
(tests/fixtures/make_catalogue.py), converted with Pillow where a format is needed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from indexer.catalogue import read_catalogue


pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hopper(fixture_data) -> Image.Image:
    """A small upright photo (the name kept from Pillow's test image that played this part)."""
    with Image.open(fixture_data.orientation / "card.jpg") as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def jpeg_bytes(fixture_data) -> bytes:
    return (fixture_data.orientation / "card.jpg").read_bytes()


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _problems(cat) -> dict[str, str]:
    return {p.where: p.reason for p in cat.problems}


def _encodable(cat) -> None:
    """The report of these problems can be written as UTF-8 JSON and printed."""
    json.dumps([p.to_dict() for p in cat.problems], ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- formats by content


@pytest.fixture(scope="module")
def odd_formats(hopper: Image.Image) -> dict[str, bytes]:
    """File name -> bytes of formats Pillow opens but a fixed extension list missed."""
    small = hopper.resize((64, 64))
    files = {
        "camera.mpo": _encode(small, "MPO"),
        "texture.dds": _encode(small, "DDS"),
        "pixels.qoi": _encode(small, "QOI"),
        "phone.heic": _encode(small, "AVIF"),  # an AVIF under a HEIF name, as phones export
        "scan.pcx": _encode(small, "PCX"),
        "icon.xbm": _encode(small.convert("1"), "XBM"),
    }
    for name, data in files.items():  # each really is a format Pillow identifies
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    return files


def test_formats_pillow_reads_are_photos_whatever_their_extension(tmp_path: Path, odd_formats, fixture_data):
    root = tmp_path / "shop"
    root.mkdir()
    for name, data in odd_formats.items():
        (root / name).write_bytes(data)
    shutil.copyfile(fixture_data.root / "broken" / "not_an_image.jpg", root / "README.txt")
    cat = read_catalogue(root)
    assert sorted(Path(r.source).name for r in cat.rows) == sorted(odd_formats)
    assert _problems(cat) == {"README.txt": "not_an_image"}
    assert "not an image" in cat.problems[0].message


def test_xpm_is_a_photo(tmp_path: Path):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "logo.xpm").write_text('/* XPM */\nstatic char *x[] = {\n"2 2 1 1",\n"a c #ff0000",\n"aa",\n"aa"\n};\n')
    cat = read_catalogue(root)
    assert [r.product_id for r in cat.rows] == ["logo"] and cat.problems == []


def test_a_folder_of_only_odd_formats_is_a_catalogue(tmp_path: Path, odd_formats):
    """It used to stop with "no photos found"."""
    root = tmp_path / "shop"
    root.mkdir()
    (root / "camera.mpo").write_bytes(odd_formats["camera.mpo"])
    cat = read_catalogue(root)
    assert [r.product_id for r in cat.rows] == ["camera"]


def test_a_jpg_name_on_html_is_not_read_but_a_broken_jpg_is_a_failure_for_the_pipeline(tmp_path: Path, jpeg_bytes):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "error-page.html").write_text("<html>404</html>")
    (root / "half.jpg").write_bytes(jpeg_bytes[:200])  # an image extension: the pipeline says what is wrong
    (root / "empty.png").write_bytes(b"")
    cat = read_catalogue(root)
    assert sorted(r.product_id for r in cat.rows) == ["empty", "half"]
    assert _problems(cat) == {"error-page.html": "not_an_image"}


# --------------------------------------------------------------------------- links and special files


@pytest.fixture
def linked_shop(tmp_path: Path, jpeg_bytes) -> Path:
    root = tmp_path / "shop"
    (root / "Men").mkdir(parents=True)
    (root / "Men" / "shirt.jpg").write_bytes(jpeg_bytes)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes)
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "leakdir").symlink_to(outside, target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "Men" / "shirt.jpg")  # inside the root: followed
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "Men" / "loop").symlink_to(root, target_is_directory=True)
    return root


def test_symlinks_out_of_the_root_are_refused_and_reported(linked_shop: Path):
    cat = read_catalogue(linked_shop)
    assert sorted(r.product_id for r in cat.rows) == ["Men/shirt", "alias"]
    assert _problems(cat) == {
        "leak.jpg": "outside_root",
        "leakdir": "outside_root",
        "gone.jpg": "broken_link",
        "Men/loop": "link_loop",
    }
    assert "--allow-outside-root" in {p.where: p for p in cat.problems}["leak.jpg"].message


def test_symlinks_out_of_the_root_on_request(linked_shop: Path):
    cat = read_catalogue(linked_shop, allow_outside_root=True)
    assert sorted(r.product_id for r in cat.rows) == ["Men/shirt", "alias", "leak", "leakdir/secret"]
    assert _problems(cat) == {"gone.jpg": "broken_link", "Men/loop": "link_loop"}


def test_fifos_sockets_and_folders_named_like_images(tmp_path: Path, jpeg_bytes):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "ok.jpg").write_bytes(jpeg_bytes)
    os.mkfifo(root / "pipe.jpg")  # opening it to sniff would block for ever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket.jpg"))
    (root / "folder.jpg").mkdir()
    (root / "folder.jpg" / "inside.jpg").write_bytes(jpeg_bytes)
    try:
        cat = read_catalogue(root)
    finally:
        sock.close()
    assert sorted(r.product_id for r in cat.rows) == ["folder.jpg/inside", "ok"]
    assert _problems(cat) == {"pipe.jpg": "not_a_file", "socket.jpg": "not_a_file"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_reported(tmp_path: Path, jpeg_bytes):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "ok.jpg").write_bytes(jpeg_bytes)
    (root / "locked.jpg").write_bytes(jpeg_bytes)
    (root / "locked.jpg").chmod(0)
    try:
        cat = read_catalogue(root)
    finally:
        (root / "locked.jpg").chmod(0o644)
    assert [r.product_id for r in cat.rows] == ["ok"]
    assert _problems(cat) == {"locked.jpg": "unreadable"}


def test_unreadable_file_is_reported_even_as_root(tmp_path: Path, jpeg_bytes, monkeypatch):
    """The same as above where the tests run as root: the open that sniffs the header is refused."""
    from PIL import Image as PILImage

    root = tmp_path / "shop"
    root.mkdir()
    (root / "ok.jpg").write_bytes(jpeg_bytes)
    (root / "locked.jpg").write_bytes(jpeg_bytes)
    real_open = PILImage.open

    def refusing_open(fp, *a, **kw):
        if str(fp).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(PILImage, "open", refusing_open)
    cat = read_catalogue(root)
    assert [r.product_id for r in cat.rows] == ["ok"]
    assert _problems(cat) == {"locked.jpg": "unreadable"}


# --------------------------------------------------------------------------- file names


def test_file_names_that_are_not_utf8_or_hold_control_characters(tmp_path: Path, jpeg_bytes):
    root = tmp_path / "shop"
    root.mkdir()
    broot = os.fsencode(root)
    for name in (b"ok.jpg", b"bad\xff.jpg", b"new\nline.jpg", b"esc\x1b.jpg", b"tab\t.jpg"):
        with open(os.path.join(broot, name), "wb") as f:
            f.write(jpeg_bytes)
    os.mkdir(os.path.join(broot, b"Caf\xe9"))
    with open(os.path.join(broot, b"Caf\xe9", b"cup.jpg"), "wb") as f:
        f.write(jpeg_bytes)
    cat = read_catalogue(root)
    assert [r.product_id for r in cat.rows] == ["ok"]
    assert _problems(cat) == {
        "bad\\xff.jpg": "bad_name",
        "new\\nline.jpg": "bad_name",
        "esc\\x1b.jpg": "bad_name",
        "tab\\t.jpg": "bad_name",
        "Caf\\xe9": "bad_name",
    }
    assert "not valid UTF-8" in {p.where: p for p in cat.problems}["bad\\xff.jpg"].message
    _encodable(cat)


# --------------------------------------------------------------------------- manifests


def test_jsonl_text_that_cannot_be_stored(tmp_path: Path, jpeg_bytes):
    (tmp_path / "p.jpg").write_bytes(jpeg_bytes)
    lines = [
        '{"id": "ok", "image": "p.jpg", "title": "fine\\ttabbed\\nlines"}',
        '{"id": "s1", "image": "p.jpg", "title": "smile \\ud83d"}',       # 2 lone high surrogate
        '{"id": "s2", "image": "p.jpg", "colour": "\\udc00"}',             # 3 lone low, in metadata
        '{"id": "n1", "image": "p.jpg", "title": "a\\u0000b"}',            # 4 NUL in a title
        '{"id": "n\\u0000", "image": "p.jpg"}',                           # 5 NUL in an id
        '{"id": "c\\u001b[31m", "image": "p.jpg"}',                       # 6 escape sequence in an id
        '{"id": "p1", "image": "p\\u0000.jpg"}',                          # 7 NUL in a path
        '{"id": "p2", "image": "p\\n.jpg"}',                              # 8 control character in a path
        '{"id": "k1", "image": "p.jpg", "\\ud800": "x"}',                  # 9 surrogate in a key
        '{"id": "j1", "image": "p.jpg", "nested": {"deep": "\\ud800"}}',  # 10 surrogate in nested JSON
        '{"id": "ok2", "image": "p.jpg", "brand": "Café"}',
        "[" * 100000 + "]" * 100000,                                      # 12 nested too deeply
    ]
    manifest = tmp_path / "cat.jsonl"
    manifest.write_bytes("\n".join(lines).encode() + b'\n{"id": "raw", "image": "p.jpg", "title": "Caf\xe9"}\n')
    cat = read_catalogue(manifest)
    assert [r.product_id for r in cat.rows] == ["ok", "ok2"]
    assert cat.products["ok"]["title"] == "fine\ttabbed\nlines"
    assert _problems(cat) == {f"cat.jsonl:{n}": "bad_text" for n in range(2, 11)} | {
        "cat.jsonl:12": "bad_json", "cat.jsonl:13": "bad_text"}
    by_where = {p.where: p for p in cat.problems}
    assert by_where["cat.jsonl:2"].product_id == "s1" and "title" in by_where["cat.jsonl:2"].message
    assert "'colour'" in by_where["cat.jsonl:3"].message
    assert "NUL" in by_where["cat.jsonl:5"].message and by_where["cat.jsonl:5"].product_id == "n\\x00"
    assert "control character" in by_where["cat.jsonl:6"].message
    _encodable(cat)


def test_csv_text_that_cannot_be_stored(tmp_path: Path, jpeg_bytes):
    import csv

    (tmp_path / "p.jpg").write_bytes(jpeg_bytes)
    body = (
        b"id,image,title,colour\n"
        b"ok,p.jpg,Plain,red\n"
        b"nul,p.jpg,a\x00b,red\n"              # 3
        b"bytes,p.jpg,Caf\xe9,red\n"            # 4 Latin-1
        b"meta,p.jpg,Ok,\xff\xfe\n"             # 5 bad bytes in metadata
        b"c\x07,p.jpg,Bell,red\n"               # 6 control character in an id
        b"big,p.jpg," + b"x" * (csv.field_size_limit() + 10) + b",red\n"  # 7 over the field limit
        b"ok2,p.jpg,\"multi\nline\",blue\n"
    )
    (tmp_path / "cat.csv").write_bytes(body)
    cat = read_catalogue(tmp_path / "cat.csv")
    assert [r.product_id for r in cat.rows] == ["ok", "ok2"]
    assert cat.products["ok2"]["title"] == "multi\nline"
    reasons = _problems(cat)
    assert list(reasons.values()) == ["bad_text"] * 4 + ["bad_row"]
    assert list(reasons)[:4] == ["cat.csv:3", "cat.csv:4", "cat.csv:5", "cat.csv:6"]
    _encodable(cat)


def test_csv_header_that_is_not_utf8_drops_that_column_only(tmp_path: Path, jpeg_bytes):
    (tmp_path / "p.jpg").write_bytes(jpeg_bytes)
    (tmp_path / "cat.csv").write_bytes(b"id,image,Farbe\xfc\na,p.jpg,rot\nb,p.jpg,blau\n")
    cat = read_catalogue(tmp_path / "cat.csv")
    assert [r.product_id for r in cat.rows] == ["a", "b"]
    assert all(r.metadata == {} for r in cat.rows)
    assert _problems(cat) == {"cat.csv:1": "bad_text"}


def test_tar_member_names_that_are_not_utf8(tmp_path: Path, jpeg_bytes):
    import tarfile

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ("ok.jpg", "caf\xe9.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg_bytes)
            tar.addfile(info, io.BytesIO(jpeg_bytes))
    cat = read_catalogue(shard)
    assert [r.product_id for r in cat.rows] == ["ok"]
    assert [(p.reason, p.where) for p in cat.problems] == [("bad_text", "s.tar:caf\\xe9")]


def test_a_file_name_holding_the_tar_separator_is_a_file(tmp_path: Path, jpeg_bytes):
    """``::`` marks a tar member only after a ``.tar`` path; a photo named so is read as a file."""
    from indexer.catalogue import read_source_bytes, tar_member

    root = tmp_path / "shop"
    root.mkdir()
    (root / "size::xl.jpg").write_bytes(jpeg_bytes)
    cat = read_catalogue(root)
    [row] = cat.rows
    assert row.product_id == "size::xl" and tar_member(row.source) is None
    assert read_source_bytes(row.source, 10**7) == jpeg_bytes
