"""Tests for indexer.catalogue: folders, CSV/JSONL manifests, tar shards and photo sources.

Photos come from the generated fixture catalogue (tests/fixtures/make_catalogue.py; copied into
tmp_path where a test needs a folder layout or a tar shard of its own); the real Magento export
tables of shared/datasets are read in place by the tests marked ``datasets``.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from indexer.catalogue import (
    TAR_SEPARATOR,
    CatalogueError,
    ColumnMap,
    read_catalogue,
    read_source_bytes,
    tar_member,
)
from indexer.images import ImageError, open_image

pytestmark = pytest.mark.unit

# Six JPEGs of the fixture catalogue: two views of two products and one photo of two others.
PHOTOS = [
    "hoodies/fx-top-01-grey-main.jpg",
    "hoodies/fx-top-01-grey-back.jpg",
    "hoodies/fx-top-02-blue-main.jpg",
    "bags/fx-bag-01-red-main.jpg",
    "bags/fx-bag-01-red-back.jpg",
    "mugs/fx-mug-01-blue-main.jpg",
]


@pytest.fixture(scope="module")
def images_dir(fixture_data) -> Path:
    d = (fixture_data.root / "images").resolve()
    for rel in PHOTOS:
        assert (d / rel).is_file(), rel
    return d


def _problems(cat) -> dict[str, str]:
    """where -> reason."""
    return {p.where: p.reason for p in cat.problems}


# --------------------------------------------------------------------------- (a) folders


@pytest.fixture
def photo_folder(tmp_path: Path, images_dir: Path) -> Path:
    root = tmp_path / "shop"
    layout = {
        "Men/Tops/hoodie-gray.jpg": PHOTOS[0],
        "Men/Tops/hoodie-gray-back.JPG": PHOTOS[1],
        "Men/jacket.jpeg": PHOTOS[2],
        "Women/Bottoms/Shorts/short.jpg": PHOTOS[3],
        "loose.jpg": PHOTOS[4],
        "Gear/bag.png": PHOTOS[5],  # a JPEG under a .png name is still an image by extension
    }
    for dest, src in layout.items():
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images_dir / src, root / dest)
    # things that are not photos of products
    (root / ".hidden.jpg").write_bytes((images_dir / PHOTOS[0]).read_bytes())
    (root / "Men" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Men" / "notes.txt").write_text("not a photo")
    (root / "Men" / "readme.md").write_text("# nope")
    (root / "Gear" / "empty-folder.jpg").mkdir()  # a folder with an image-like name
    return root


def test_folder_ids_categories_and_sources(photo_folder: Path):
    cat = read_catalogue(photo_folder)
    by_id = {r.product_id: r for r in cat.rows}
    assert set(by_id) == {
        "Men/Tops/hoodie-gray",
        "Men/Tops/hoodie-gray-back",
        "Men/jacket",
        "Women/Bottoms/Shorts/short",
        "loose",
        "Gear/bag",
    }
    assert cat.products["Men/Tops/hoodie-gray"]["category"] == "Men/Tops"
    assert cat.products["Women/Bottoms/Shorts/short"]["category"] == "Women/Bottoms/Shorts"
    assert cat.products["Men/jacket"]["category"] == "Men"
    assert cat.products["loose"]["category"] is None
    assert cat.products["Men/Tops/hoodie-gray"]["title"] == "hoodie-gray"
    # sources are absolute paths to the files themselves, readable as images
    for pid, row in by_id.items():
        src = Path(row.source)
        assert src.is_absolute() and src.is_file()
        assert src.resolve().relative_to(photo_folder.resolve()).with_suffix("").as_posix() == pid
    assert by_id["Men/Tops/hoodie-gray-back"].source.endswith("hoodie-gray-back.JPG")
    assert min(open_image(by_id["Men/jacket"].source).size) > 100


def test_folder_skips_hidden_and_non_images_and_reports_each(photo_folder: Path):
    cat = read_catalogue(photo_folder)
    sources = [Path(r.source).name for r in cat.rows]
    assert ".hidden.jpg" not in sources
    assert not any(name.endswith((".txt", ".md", ".DS_Store")) for name in sources)
    assert "empty-folder.jpg" not in sources
    assert len(cat.rows) == 6
    # every file not read is in the report with its reason; the empty folder is a folder, not a file
    assert _problems(cat) == {
        ".hidden.jpg": "hidden",
        "Men/.DS_Store": "hidden",
        "Men/notes.txt": "not_an_image",
        "Men/readme.md": "not_an_image",
    }


def test_folder_ignores_files_in_hidden_folders(photo_folder: Path, images_dir: Path):
    """Thumbnail caches and VCS folders (.thumbnails/, .git/, .@__thumb/) are not catalogue content."""
    for hidden in (".thumbnails/Men", ".git/objects"):
        (photo_folder / hidden).mkdir(parents=True)
        shutil.copyfile(images_dir / PHOTOS[0], photo_folder / hidden / "thumb.jpg")
    cat = read_catalogue(photo_folder)
    assert sorted(r.product_id for r in cat.rows if "/." in "/" + r.product_id) == []
    assert len(cat.rows) == 6


def test_folder_same_stem_two_extensions_is_one_product(tmp_path: Path, images_dir: Path):
    root = tmp_path / "f"
    root.mkdir()
    shutil.copyfile(images_dir / PHOTOS[0], root / "hoodie.jpg")
    shutil.copyfile(images_dir / PHOTOS[1], root / "hoodie.png")
    cat = read_catalogue(root)
    assert list(cat.products) == ["hoodie"]
    assert len(cat.rows) == 2


# --------------------------------------------------------------------------- (b) CSV


def _write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_custom_columns_and_extra_metadata(tmp_path: Path, images_dir: Path):
    src = [str(images_dir / p) for p in PHOTOS]
    manifest = _write_csv(
        tmp_path / "cat.csv",
        ["sku", "picture", "name", "dept", "price", "colour"],
        [
            ["MH01", src[0], "Chaz Hoodie", "Men/Tops", "52.00", "Gray"],
            ["MH02", src[2], "Teton Pullover", "Men/Tops", "70.00", "Black"],
            ["WB01", src[3], "Zoe Tank", "Women/Tops", "", "Black"],
        ],
    )
    cat = read_catalogue(manifest, ColumnMap(id="sku", image="picture", title="name", category="dept"))
    assert cat.problems == []
    assert [r.product_id for r in cat.rows] == ["MH01", "MH02", "WB01"]
    assert [r.source for r in cat.rows] == [src[0], src[2], src[3]]
    assert cat.products["MH01"] == {
        "title": "Chaz Hoodie",
        "category": "Men/Tops",
        "metadata": {"price": "52.00", "colour": "Gray"},
    }
    # an empty cell is not metadata
    assert cat.products["WB01"]["metadata"] == {"colour": "Black"}
    assert cat.rows[0].metadata == {"price": "52.00", "colour": "Gray"}
    assert cat.rows[1].where == "cat.csv:3"


def test_csv_semicolon_delimiter_is_sniffed(tmp_path: Path, images_dir: Path):
    manifest = _write_csv(
        tmp_path / "export.csv",
        ["id", "image", "title", "price"],
        [
            ["MH01", str(images_dir / PHOTOS[0]), "Chaz Hoodie, gray", "52,00"],
            ["MH02", str(images_dir / PHOTOS[2]), 'The "Teton" Pullover', "70,00"],
            ["MB01", str(images_dir / PHOTOS[5]), "Joust Duffle Bag", "34,00"],
        ],
        delimiter=";",
    )
    cat = read_catalogue(manifest)
    assert cat.problems == []
    assert list(cat.products) == ["MH01", "MH02", "MB01"]
    assert cat.products["MH01"]["title"] == "Chaz Hoodie, gray"
    assert cat.products["MH02"]["title"] == 'The "Teton" Pullover'
    assert cat.products["MH01"]["metadata"] == {"price": "52,00"}
    assert Path(cat.rows[2].source) == images_dir / PHOTOS[5]


def test_csv_tab_and_bom(tmp_path: Path, images_dir: Path):
    manifest = tmp_path / "cat.tsv"
    manifest.write_text(
        "\ufeffid\timage\ttitle\n" f"a\t{images_dir / PHOTOS[0]}\tHoodie\n" f"b\t{images_dir / PHOTOS[2]}\tJacket\n",
        encoding="utf-8",
    )
    cat = read_catalogue(manifest)
    assert [r.product_id for r in cat.rows] == ["a", "b"]
    assert cat.products["b"]["title"] == "Jacket"


def test_csv_row_with_too_many_fields_is_reported(tmp_path: Path, images_dir: Path):
    manifest = tmp_path / "cat.csv"
    manifest.write_text(
        f"id,image\na,{images_dir / PHOTOS[0]}\nb,{images_dir / PHOTOS[1]},surplus\nc,{images_dir / PHOTOS[2]}\n"
    )
    cat = read_catalogue(manifest)
    assert [r.product_id for r in cat.rows] == ["a", "c"]
    assert _problems(cat) == {"cat.csv:3": "bad_row"}


def test_real_magento_export_is_parsed_like_the_csv_module(datasets_dir: Path):
    """configurable_products.csv: 1994 rows with quoted multi-line HTML descriptions, some of which
    hold doubled quotes (""). Every record must come out whole: same ids as csv.DictReader reads."""
    magento = datasets_dir / "magento"
    path = magento / "fixtures" / "configurable_products.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reference = list(csv.DictReader(f))
    assert len(reference) == 1994
    cat = read_catalogue(
        path,
        ColumnMap(id="sku", image="base_image", title="name", category="categories"),
        image_root=magento / "images",
    )
    assert not [p for p in cat.problems if p.reason == "bad_row"]
    with_image = [r["sku"] for r in reference if r["base_image"].strip()]
    without = [r["sku"] for r in reference if not r["base_image"].strip()]
    assert [r.product_id for r in cat.rows] == with_image
    assert sorted(p.product_id for p in cat.problems if p.reason == "empty_image") == sorted(without)
    ref = {r["sku"]: r for r in reference}
    for row in cat.rows:
        assert cat.products[row.product_id]["title"] == ref[row.product_id]["name"].strip()
        assert row.metadata["description"] == ref[row.product_id]["description"]
        assert Path(row.source).is_file()


# --------------------------------------------------------------------------- (c) JSONL


def _write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_jsonl_rows_sharing_an_id_make_one_product(tmp_path: Path, images_dir: Path):
    src = [str(images_dir / p) for p in PHOTOS]
    manifest = _write_jsonl(
        tmp_path / "cat.jsonl",
        [
            {"id": "MH01", "image": src[0], "title": "Chaz Hoodie", "category": "Men/Tops",
             "price": 52, "brand": "Luma", "view": "main", "tags": ["eco", "warm"]},
            {"id": "MH02", "image": src[2], "title": "Teton Pullover", "category": "Men/Tops", "price": 70},
            {"id": "MH01", "image": src[1], "title": "Chaz Hoodie", "category": "Men/Tops",
             "price": 52, "brand": "Luma", "view": "back", "tags": ["eco", "warm"]},
            "",
            {"id": "MH01", "image": src[4], "price": 52, "brand": "Luma", "view": "alt1", "tags": ["eco", "warm"]},
        ],
    )
    cat = read_catalogue(manifest)
    assert cat.problems == []
    assert list(cat.products) == ["MH01", "MH02"]
    rows = [r for r in cat.rows if r.product_id == "MH01"]
    assert [r.source for r in rows] == [src[0], src[1], src[4]]
    assert [r.where for r in rows] == ["cat.jsonl:1", "cat.jsonl:3", "cat.jsonl:5"]
    product = cat.products["MH01"]
    assert product["title"] == "Chaz Hoodie" and product["category"] == "Men/Tops"
    # the columns every row agrees on; lists are kept as JSON text
    assert product["metadata"] == {"price": 52, "brand": "Luma", "tags": '["eco", "warm"]'}
    assert [r.metadata["view"] for r in rows] == ["main", "back", "alt1"]
    assert cat.products["MH02"]["metadata"] == {"price": 70}


def test_jsonl_numeric_ids_become_strings(tmp_path: Path, images_dir: Path):
    manifest = _write_jsonl(tmp_path / "c.ndjson", [{"id": 42, "image": str(images_dir / PHOTOS[0])}])
    cat = read_catalogue(manifest)
    assert list(cat.products) == ["42"]


# --------------------------------------------------------------------------- (d) row problems


def test_row_problems_are_reported_not_fatal(tmp_path: Path, images_dir: Path):
    shop = tmp_path / "shop"
    shop.mkdir()
    shutil.copyfile(images_dir / PHOTOS[0], shop / "hoodie.jpg")
    manifest = _write_jsonl(
        shop / "cat.jsonl",
        [
            {"id": "ok", "image": "hoodie.jpg", "title": "Hoodie"},            # 1
            {"id": "", "image": "hoodie.jpg"},                                 # 2 empty id
            {"id": "   ", "image": "hoodie.jpg"},                              # 3 blank id
            {"id": "noimg", "image": ""},                                      # 4 empty image
            {"id": "nullimg", "image": None},                                  # 5
            {"id": "evil", "image": "../../etc/passwd"},                       # 6 outside root
            {"id": "ftp", "image": "ftp://x/y.jpg"},                           # 7 bad url
            "{not json",                                                       # 8
            "[1, 2]",                                                          # 9 not an object
            {"id": "ok", "image": str(images_dir / PHOTOS[1]), "title": "Other title"},  # 10 conflict
            {"id": "web", "image": "https://shop.example/p.jpg"},              # 11 fine
            {"id": "file", "image": "file:///etc/passwd"},                     # 12 bad url
        ],
    )
    cat = read_catalogue(manifest)
    assert _problems(cat) == {
        "cat.jsonl:2": "empty_id",
        "cat.jsonl:3": "empty_id",
        "cat.jsonl:4": "empty_image",
        "cat.jsonl:5": "empty_image",
        "cat.jsonl:6": "outside_root",
        "cat.jsonl:7": "bad_url",
        "cat.jsonl:8": "bad_json",
        "cat.jsonl:9": "bad_json",
        "cat.jsonl:10": "conflicting_metadata",
        "cat.jsonl:12": "bad_url",
    }
    by_where = {p.where: p for p in cat.problems}
    assert by_where["cat.jsonl:6"].product_id == "evil"
    assert "--allow-outside-root" in by_where["cat.jsonl:6"].message
    assert by_where["cat.jsonl:10"].product_id == "ok"
    assert by_where["cat.jsonl:6"].to_dict()["id"] == "evil"
    # the conflicting row's photo is still a photo of the product; the first title is kept
    assert cat.products["ok"]["title"] == "Hoodie"
    assert [r.source for r in cat.rows if r.product_id == "ok"] == [str(shop / "hoodie.jpg"), str(images_dir / PHOTOS[1])]
    assert cat.rows[-1].source == "https://shop.example/p.jpg"
    assert set(cat.products) == {"ok", "web"}


def test_outside_root_allowed_on_request(tmp_path: Path):
    shop = tmp_path / "shop"
    shop.mkdir()
    manifest = _write_jsonl(shop / "cat.jsonl", [{"id": "evil", "image": "../../etc/passwd"},
                                                 {"id": "sib", "image": "../other/x.jpg"}])
    refused = read_catalogue(manifest)
    assert [p.reason for p in refused.problems] == ["outside_root", "outside_root"]
    cat = read_catalogue(manifest, allow_outside_root=True)
    assert cat.problems == []
    assert [r.source for r in cat.rows] == [str((shop / "../../etc/passwd").resolve()),
                                           str((tmp_path / "other" / "x.jpg").resolve())]


def test_conflicting_category_reported_first_kept(tmp_path: Path, images_dir: Path):
    manifest = _write_csv(
        tmp_path / "c.csv", ["id", "image", "title", "category"],
        [["a", str(images_dir / PHOTOS[0]), "T", "Men"], ["a", str(images_dir / PHOTOS[1]), "T", "Women"]],
    )
    cat = read_catalogue(manifest)
    assert [(p.reason, p.where) for p in cat.problems] == [("conflicting_metadata", "c.csv:3")]
    assert "category" in cat.problems[0].message
    assert cat.products["a"]["category"] == "Men"
    assert len(cat.rows) == 2


# --------------------------------------------------------------------------- (e) missing columns


@pytest.mark.parametrize("header", [["sku", "image"], ["id", "picture"]])
def test_missing_id_or_image_column_is_a_catalogue_error(tmp_path: Path, header):
    manifest = _write_csv(tmp_path / "c.csv", header + ["title"], [["a", "b.jpg", "T"]])
    with pytest.raises(CatalogueError) as e:
        read_catalogue(manifest)
    msg = str(e.value)
    assert "--id-column" in msg and "--image-column" in msg
    missing = "id" if header[0] == "sku" else "image"
    assert repr(missing) in msg
    assert "'title'" in msg  # names the columns the file does have


def test_missing_column_jsonl(tmp_path: Path):
    manifest = _write_jsonl(tmp_path / "c.jsonl", [{"sku": "a", "image": "x.jpg"}])
    with pytest.raises(CatalogueError, match="--id-column"):
        read_catalogue(manifest)
    # the same file read with the right mapping is fine
    cat = read_catalogue(manifest, ColumnMap(id="sku"))
    assert list(cat.products) == ["a"]


def test_unknown_catalogue_kinds(tmp_path: Path):
    with pytest.raises(CatalogueError, match="does not exist"):
        read_catalogue(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(CatalogueError):
        read_catalogue(tmp_path / "x.xlsx")


def test_non_utf8_csv_rows_are_reported_and_the_rest_read(tmp_path: Path):
    """A Latin-1 byte costs its row, not the whole manifest (it used to stop the run)."""
    (tmp_path / "latin1.csv").write_bytes("id,image,title\na,x.jpg,Caf\xe9\nb,y.jpg,Plain\n".encode("latin-1"))
    cat = read_catalogue(tmp_path / "latin1.csv")
    assert [r.product_id for r in cat.rows] == ["b"]
    [problem] = cat.problems
    assert (problem.where, problem.reason, problem.product_id) == ("latin1.csv:2", "bad_text", "a")
    assert "title is not valid UTF-8" in problem.message and "\\xe9" in problem.message
    json.dumps(problem.to_dict()).encode("utf-8")  # printable and encodable


# --------------------------------------------------------------------------- (f) image_root


def test_image_root_with_magento_leading_slash_paths(datasets_dir: Path):
    magento = datasets_dir / "magento"
    cat = read_catalogue(
        magento / "fixtures" / "simple_images_gear_bags.csv", ColumnMap(id="sku"), image_root=magento / "images"
    )
    assert cat.problems == []
    with open(magento / "fixtures" / "simple_images_gear_bags.csv", newline="") as f:
        reference = list(csv.DictReader(f))
    assert len(cat.rows) == len(reference) == 18
    for row, ref in zip(cat.rows, reference):
        assert row.product_id == ref["sku"]
        assert row.source == str((magento / "images").resolve() / ref["image"].lstrip("/"))
        assert Path(row.source).is_file()


def test_image_root_relative_and_default_root(tmp_path: Path, images_dir: Path):
    manifest = _write_csv(tmp_path / "c.csv", ["id", "image"], [["a", f"/{PHOTOS[0]}"], ["b", PHOTOS[1]]])
    cat = read_catalogue(manifest, image_root=images_dir)
    assert [r.source for r in cat.rows] == [str(images_dir / PHOTOS[0]), str(images_dir / PHOTOS[1])]
    # without image_root, relative paths resolve against the manifest's folder and a
    # leading slash means an absolute path
    cat = read_catalogue(manifest)
    assert [r.source for r in cat.rows] == [f"/{PHOTOS[0]}", str(tmp_path.resolve() / PHOTOS[1])]
    # a leading slash does not escape the explicit root either
    manifest = _write_csv(tmp_path / "d.csv", ["id", "image"], [["a", "/../../etc/passwd"]])
    cat = read_catalogue(manifest, image_root=images_dir)
    assert [p.reason for p in cat.problems] == ["outside_root"]


# --------------------------------------------------------------------------- (g) tar shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path, images_dir: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    jpg = [(images_dir / p).read_bytes() for p in PHOTOS]
    with tarfile.open(d / "shard-000.tar", "w") as tar:
        _add(tar, "000001.jpg", jpg[0])
        _add(tar, "000001.json", json.dumps({"id": "MH01", "title": "Chaz Hoodie", "category": "Men/Tops",
                                             "price": 52}).encode())
        _add(tar, "000002.jpg", jpg[1])
        _add(tar, "000002.json", json.dumps({"id": "MH01", "price": 52}).encode())
        _add(tar, "000003.jpg", jpg[2])
        _add(tar, "000003.txt", "Teton Pullover\n".encode())
        _add(tar, "000003.cls", b"Men/Jackets")
        _add(tar, "000004.json", json.dumps({"id": "ghost", "title": "no image"}).encode())  # ignored
        _add(tar, "000004.txt", b"no image")
    with tarfile.open(d / "shard-001.tar", "w") as tar:
        _add(tar, "sub/000005.jpg", jpg[3])
        _add(tar, "sub/000005.txt", b"Zoe Tank")
        _add(tar, "sub/000005.json", b"{broken")
        _add(tar, "000006.jpeg", jpg[5])
    (d / "shard-002.tar").write_bytes(b"this is not a tar archive" * 40)
    return d


def test_shard_folder(shards: Path):
    cat = read_catalogue(shards)
    assert set(cat.products) == {"MH01", "000003", "sub/000005", "000006"}
    mh01 = [r for r in cat.rows if r.product_id == "MH01"]
    assert [tar_member(r.source) for r in mh01] == [
        (str(shards.resolve() / "shard-000.tar"), "000001.jpg"),
        (str(shards.resolve() / "shard-000.tar"), "000002.jpg"),
    ]
    assert cat.products["MH01"]["title"] == "Chaz Hoodie"
    assert cat.products["MH01"]["category"] == "Men/Tops"
    assert cat.products["MH01"]["metadata"] == {"price": 52}
    assert cat.products["000003"]["title"] == "Teton Pullover"
    assert cat.products["000003"]["category"] == "Men/Jackets"
    assert cat.products["sub/000005"]["title"] == "Zoe Tank"
    assert "ghost" not in cat.products and "000004" not in cat.products
    reasons = sorted((p.where, p.reason) for p in cat.problems)
    assert reasons == [("shard-001.tar:sub/000005", "bad_json"), ("shard-002.tar", "bad_shard")]
    # every source reads back as the member's bytes and decodes
    for r in cat.rows:
        data = read_source_bytes(r.source, 10_000_000)
        assert open_image(data).size[0] > 100


def test_single_shard_file(shards: Path):
    cat = read_catalogue(shards / "shard-001.tar")
    assert sorted(cat.products) == ["000006", "sub/000005"]
    cat = read_catalogue(shards / "shard-002.tar")
    assert cat.rows == [] and [p.reason for p in cat.problems] == ["bad_shard"]


def test_truncated_compressed_shard_is_a_bad_shard(tmp_path: Path, images_dir: Path):
    """A shard cut short in transfer must be reported, not stop the whole catalogue."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "a.jpg", (images_dir / PHOTOS[0]).read_bytes())
    packed = gzip.compress(buf.getvalue())
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.tar").write_bytes(packed[: len(packed) // 2])
    with tarfile.open(d / "b.tar", "w") as tar:
        _add(tar, "b.jpg", (images_dir / PHOTOS[1]).read_bytes())
    cat = read_catalogue(d)
    assert list(cat.products) == ["b"]
    assert [(p.where, p.reason) for p in cat.problems] == [("a.tar", "bad_shard")]


def test_folder_with_images_and_tars_is_a_folder(shards: Path, images_dir: Path):
    shutil.copyfile(images_dir / PHOTOS[0], shards / "loose.jpg")
    cat = read_catalogue(shards)
    assert list(cat.products) == ["loose"]


# --------------------------------------------------------------------------- (h) read_source_bytes


def test_read_source_bytes_tar_member(shards: Path, images_dir: Path):
    shard = str(shards / "shard-000.tar")
    cache: dict = {}
    data = read_source_bytes(f"{shard}{TAR_SEPARATOR}000003.jpg", 10_000_000, cache)
    assert data == (images_dir / PHOTOS[2]).read_bytes()
    assert shard in cache  # the open archive is reused
    assert read_source_bytes(f"{shard}{TAR_SEPARATOR}000001.jpg", 10_000_000, cache) == (images_dir / PHOTOS[0]).read_bytes()
    with pytest.raises(ImageError) as e:
        read_source_bytes(f"{shard}{TAR_SEPARATOR}nope.jpg", 10_000_000, cache)
    assert e.value.reason == "not_found"
    with pytest.raises(ImageError) as e:
        read_source_bytes(f"{shard}{TAR_SEPARATOR}000003.jpg", 1000, cache)
    assert e.value.reason == "too_large"


def test_read_source_bytes_missing_shard_is_not_found(tmp_path: Path):
    with pytest.raises(ImageError) as e:
        read_source_bytes(f"{tmp_path / 'gone.tar'}{TAR_SEPARATOR}a.jpg", 1000)
    assert e.value.reason == "not_found"


def test_read_source_bytes_files(tmp_path: Path, images_dir: Path):
    path = images_dir / PHOTOS[0]
    size = path.stat().st_size
    assert read_source_bytes(str(path), size) == path.read_bytes()  # exactly at the limit is fine
    with pytest.raises(ImageError) as e:
        read_source_bytes(str(path), size - 1)
    assert e.value.reason == "too_large"
    assert str(size) in str(e.value)
    with pytest.raises(ImageError) as e:
        read_source_bytes(str(tmp_path / "missing.jpg"), 1000)
    assert e.value.reason == "not_found"
    with pytest.raises(ImageError) as e:
        read_source_bytes(str(tmp_path), 10_000_000)
    assert e.value.reason == "not_an_image"


def test_tar_member_split():
    assert tar_member("/a/b.tar::x/y.jpg") == ("/a/b.tar", "x/y.jpg")
    assert tar_member("/a/b.jpg") is None
    assert tar_member("https://h/x::y.jpg") is None
