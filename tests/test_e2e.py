"""End to end, as a user runs it (the README's main job): prepare the Magento catalogue, index it
with the CLI and the bundled lookalike-base model, start the real server on a loopback port and
query it over HTTP."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import served

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args, **kw):
    exe = shutil.which(args[0], path=str(BIN)) or args[0]
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=600, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def built(datasets_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    manifest = tmp / "magento.jsonl"
    r = _run(sys.executable, "scripts/prepare_magento.py", str(datasets_dir / "magento"), "--out", str(manifest))
    assert r.returncode == 0, r.stderr
    assert "of 191 products" in r.stdout
    index = tmp / "index"
    r = _run("lookalike", "index", str(manifest), "--out", str(index), "--model", "lookalike-base", "--json", "-q")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return tmp, manifest, index, report


@pytest.fixture(scope="module")
def server(built):
    with served(built[2]) as base:
        yield base


def test_full_catalogue_indexed(built):
    _, manifest, index, report = built
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert report["indexed"] == len({(r["id"], r["image"]) for r in rows}) == 725
    assert report["failed"] == 0
    assert report["index_products"] == 191
    saved = json.loads((index / "report.json").read_text())
    assert saved["indexed"] == 725


def test_http_find_similar_text_labels_errors(built, server):
    _, manifest, _, _ = built
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    row = next(r for r in rows if r["image"].endswith("mh01-gray_main.jpg"))
    with open(row["image"], "rb") as f:
        r = httpx.post(server + "/v1/search/image?k=5", files={"image": ("q.jpg", f, "image/jpeg")}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0]["id"] == "MH01"
    assert body["results"][0]["score"] >= 0.99
    assert abs(sum(x["score"] for x in httpx.post(
        server + "/v1/labels?k=1000", files={"image": ("q.jpg", open(row["image"], "rb"), "image/jpeg")}, timeout=60
    ).json()["labels"]) - 1) < 1e-4

    r = httpx.post(server + "/v1/search/text", json={"query": "red running shoes", "k": 8}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 8

    r = httpx.post(server + "/v1/search/image", files={"image": ("notes.jpg", b"hello, not a photo\n" * 10, "image/jpeg")},
                   timeout=60)
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["code"] == "not_an_image"
    assert httpx.get(server + "/readyz", timeout=10).json()["products"] == 191


def test_no_close_match_for_unrelated_queries(built, server):
    """The bundled model's calibrated thresholds answer "nothing like this" for noise and for a text with
    no known word, and "a close match" for a catalogue photo."""
    import io

    import numpy as np
    from PIL import Image

    _, manifest, _, _ = built
    photo = next(json.loads(x)["image"] for x in manifest.read_text().splitlines() if "mh01-gray_main" in x)
    with open(photo, "rb") as f:
        body = httpx.post(server + "/v1/search/image?k=3", files={"image": ("q.jpg", f, "image/jpeg")}, timeout=60).json()
    assert body["close_match"] is True and body["none_of_these"] is False
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(buf, "PNG")
    body = httpx.post(server + "/v1/search/image?k=3", files={"image": ("n.png", buf.getvalue(), "image/png")},
                      timeout=60).json()
    assert body["close_match"] is False and len(body["results"]) == 3  # answered, and flagged
    body = httpx.post(server + "/v1/search/text", json={"query": "\U0001f642\U0001f680\u2728", "k": 3}, timeout=60).json()
    assert body["close_match"] is False and all(r["score"] == 0 for r in body["results"])
    body = httpx.post(server + "/v1/search/text", json={"query": "hooded sweatshirt", "k": 3}, timeout=60).json()
    assert body["close_match"] is True
    # text: the calibrated text_min_score (0.338) tells a type the shop sells from one it does not, as a hint
    # (balanced accuracy 0.70 on held-out products). Measured 2026-12-01 over these photos: "backpack" 0.513,
    # "lipstick" 0.258, "necklace" 0.186, "laptop" 0.233; it errs on others ("red running shoes" 0.342,
    # "ankle boots" 0.406 pass it), which is why the README calls it a hint.
    for query, sold in (("backpack", True), ("lipstick", False), ("necklace", False), ("laptop", False)):
        body = httpx.post(server + "/v1/search/text", json={"query": query, "k": 3}, timeout=60).json()
        assert body["close_match"] is sold, (query, body["results"][0]["score"])


def test_cli_info_search_check_label_and_rerun(built):
    tmp, manifest, index, _ = built
    info = json.loads(_run("lookalike", "info", str(index), "--json").stdout)
    assert info["products"] == 191 and info["photos"] == 725 and info["dim"] == 512
    assert info["model"]["name"] == "lookalike-base"

    r = _run("lookalike", "check", str(index))
    assert r.returncode == 0 and "consistent" in r.stdout

    img = next(json.loads(x)["image"] for x in manifest.read_text().splitlines() if "mj01" in x)
    hits = json.loads(_run("lookalike", "search", str(index), "--image", img, "-k", "3", "--json").stdout)["results"]
    assert hits[0]["id"] == "MJ01" and hits[0]["score"] >= 0.99 and len(hits) == 3

    r = _run("lookalike", "label", str(index), "--report", str(tmp / "labels.csv"))
    assert r.returncode == 0, r.stderr
    import csv

    with open(tmp / "labels.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert len(report) == 191 and list(report[0])[:5] == ["id", "label", "score", "cosine", "none_of_these"]
    # the reject option: a product no label fits keeps no label, and says so (never a wrong label)
    for row in report:
        assert (row["label"] == "") == (row["none_of_these"] == "True"), row
    by_id = {row["id"]: row for row in report}
    assert by_id["MH09"]["label"] == "hoodie" and by_id["24-MB01"]["label"] in ("backpack", "bag")
    p = json.loads(_run("lookalike", "search", str(index), "--text", "bag", "-k", "1", "--json").stdout)["results"][0]
    assert p["label"] in ("bag", "backpack") and 0 < p["label_score"] <= 1

    r = _run("lookalike", "index", str(manifest), "--out", str(index), "--model", "lookalike-base", "--json", "-q")
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["indexed"] == 0 and again["unchanged"] == 725


def test_cli_errors_are_one_line(built, tmp_path):
    _, manifest, index, _ = built
    cases = [
        ("lookalike", "index", str(tmp_path / "missing"), "--out", str(tmp_path / "i"), "--model", "test-tiny"),
        ("lookalike", "info", str(tmp_path)),
        ("lookalike", "search", str(index), "--text", "x", "--model", "ViT-B-32", "--pretrained", "none"),
        ("lookalike", "search", str(index), "--image", str(manifest)),
        ("lookalike", "search", str(index), "--image", str(tmp_path / "missing.jpg")),
        ("lookalike", "label", str(manifest), "--labels", str(manifest), "--model", "test-tiny"),
        ("lookalike", "index", str(manifest), "--out", str(index), "--model", "lookalike-base", "--id-column", "sku_nope"),
        ("lookalike", "index", str(manifest), "--out", str(index), "--model", "test-tiny"),  # not the index's model
    ]
    for args in cases:
        r = _run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.startswith("lookalike: error: "), r.stderr


def test_label_closed_set_with_the_catalogues_own_categories(built):
    """`lookalike label INDEX --closed-set` with a label set made of the catalogue's own leaf categories
    (a closed set: every label names products it holds) ranks labels relative to the catalogue's
    photos (indexer.labels' hubness correction); on this catalogue it labels products as well as
    plain cosines do (it lifts words the model never trained on, tests/test_bundled_model.py)."""
    import csv

    from indexer.datasets import category_phrase

    tmp, manifest, index, _ = built
    copy = tmp / "closed-set-index"
    shutil.copytree(index, copy, ignore=shutil.ignore_patterns(".lock"))
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    category = {r["id"]: r["category"] for r in rows if r.get("category")}
    leaves = sorted(set(category.values()))
    (tmp / "categories.json").write_text(json.dumps(
        {"labels": [{"name": c, "prompts": [category_phrase(c)]} for c in leaves]}))
    accuracy = {}
    for flag in ((), ("--closed-set",)):
        out = tmp / f"categories{len(flag)}.csv"
        r = _run("lookalike", "label", str(copy), "--labels", str(tmp / "categories.json"), "--report", str(out), *flag)
        assert r.returncode == 0 and "fewer than" not in r.stderr, r.stderr
        with open(out, newline="") as f:
            scored = [(row["id"], json.loads(row["labels"])[0]["label"]) for row in csv.DictReader(f)]
        accuracy[flag] = np.mean([label == category[pid] for pid, label in scored if pid in category])
    assert accuracy[()] >= 0.85 and accuracy[("--closed-set",)] >= accuracy[()] - 0.03, accuracy


def test_a_hoodie_photo_finds_hoodies_and_is_labelled_hoodie(built, server):
    """MH09 (Abominable Hoodie) is one of the products held out of lookalike-base's training."""
    photo = "/m/h/mh09-blue_main.jpg"
    _, manifest, _, _ = built
    path = next(json.loads(x)["image"] for x in manifest.read_text().splitlines() if x and photo in x)
    with open(path, "rb") as f:
        body = httpx.post(server + "/v1/search/image?k=6", files={"image": ("q.jpg", f, "image/jpeg")}, timeout=60).json()
    results = body["results"]
    assert results[0]["id"] == "MH09" and results[0]["score"] >= 0.99
    hoodies = [r for r in results[1:] if r["category"].endswith("Hoodies & Sweatshirts")]
    assert len(hoodies) >= 3, [(r["id"], r["category"]) for r in results]
    assert all(r["category"].split("/")[-1] in ("Hoodies & Sweatshirts", "Jackets") for r in results[1:])
    assert body["labels"][0]["label"] == "hoodie" and body["labels"][0]["score"] > 0.5
    text = httpx.post(server + "/v1/search/text", json={"query": "hoodie", "k": 5}, timeout=60).json()["results"]
    # measured 2026-12-01: MH09, MH01, WJ04 (Ingrid Running Jacket), MH08, MH07; the model of 2026-11-30 gave
    # five hoodies. Same rule as the photo search above: hoodies first, a jacket at most once.
    cats = [r["category"].split("/")[-1] for r in text]
    assert cats[0] == "Hoodies & Sweatshirts" and cats.count("Hoodies & Sweatshirts") >= 4, cats
    assert set(cats) <= {"Hoodies & Sweatshirts", "Jackets"}, cats
    # labels as a closed set (the catalogue's own leaf categories, ranked against its 725 photos)
    leaves = sorted({(json.loads(x).get("category") or "").split("/")[-1] for x in manifest.read_text().splitlines()
                     if x} - {""})
    with open(path, "rb") as f:
        r = httpx.post(server + "/v1/labels?closed_set=true&k=3", files={"image": ("q.jpg", f, "image/jpeg")},
                       data={"labels": leaves}, timeout=60)
    assert r.status_code == 200 and r.json()["closed_set"] is True, r.text
    assert r.json()["labels"][0]["label"] == "Hoodies & Sweatshirts", r.json()
