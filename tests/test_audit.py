"""The catalogue audit (indexer/audit.py): near-duplicate groups, exact duplicates, category
disagreements and outliers; the CLI's three report files; GET /v1/audit (auth, bad parameters, the
photo limit on a real server) and the audit page in Chromium.

Tests whose answer depends on the model's quality (near-duplicates, wrong categories) run on a slice
of the Magento catalogue with the bundled ``lookalike-base``; the rest on the generated fixture
catalogue with ``test-tiny``, with a product that reuses another's photo file.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, served
from eval_audit import reencode

MAGENTO_CATEGORIES = ("Gear/Bags", "Gear/Watches", "Men/Bottoms/Pants", "Men/Tops/Tees")
KEY = "audit-test-key"


def _index(rows: list[dict], out: Path, model) -> Path:
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    manifest = out.with_suffix(".jsonl")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with Store.create(out, model.identity) as store:
        index_catalogue(read_catalogue(manifest), store, model, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def dup_index(fixture_data, tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """The fixture catalogue plus product FX-REUSED, whose one photo is another product's file."""
    rows = fixture_data.rows()
    original = rows[0]
    rows.append({**original, "id": "FX-REUSED", "title": "Reused photo"})
    return _index(rows, tmp_path_factory.mktemp("audit") / "dup-index", tiny_model), original


@pytest.fixture(scope="module")
def base_model():
    from indexer.model import load_model

    return load_model("lookalike-base", None, "cpu")


@pytest.fixture(scope="module")
def magento_audit(datasets_dir, base_model, tmp_path_factory):
    """A Magento slice (4 categories, 2 photos a product) with planted faults, indexed with lookalike-base
    and audited: a watch filed under Pants, a bag under Tees, one bag photo re-encoded into two other
    products (one near-duplicate group of three), one tee photo copied byte for byte into a pants product."""
    from indexer.audit import run_audit
    from indexer.magento import build_manifest
    from indexer.store import Store

    rows, _ = build_manifest(datasets_dir / "magento")
    kept, per_product = [], {}
    for r in rows:
        if r["category"] in MAGENTO_CATEGORIES and per_product.get(r["id"], 0) < 2:
            per_product[r["id"]] = per_product.get(r["id"], 0) + 1
            kept.append(r)
    by_cat = {c: sorted({r["id"] for r in kept if r["category"] == c}) for c in MAGENTO_CATEGORIES}
    first = {r["id"]: r for r in reversed(kept)}
    tmp = tmp_path_factory.mktemp("magento-audit")
    watch, bag = by_cat["Gear/Watches"][0], by_cat["Gear/Bags"][0]
    for r in kept:
        if r["id"] == watch:
            r["category"] = "Men/Bottoms/Pants"
        if r["id"] == bag:
            r["category"] = "Men/Tops/Tees"
    source, targets = by_cat["Gear/Bags"][1], [by_cat["Men/Tops/Tees"][1], by_cat["Gear/Watches"][1]]
    for n, target in enumerate(targets):
        copy = tmp / f"near-{n}.jpg"
        reencode(Path(first[source]["image"]), copy)
        kept.append({**first[target], "image": str(copy)})
    tee, pants = by_cat["Men/Tops/Tees"][2], by_cat["Men/Bottoms/Pants"][1]
    kept.append({**first[pants], "image": first[tee]["image"]})
    index = _index(kept, tmp / "index", base_model)
    with Store.open(index) as store:
        report = run_audit(store, base_model)
    truth = {"wrong": {watch, bag}, "near": {source, *targets}, "exact": {tee, pants}}
    return report, truth


# ------------------------------------------------------------------------ unit
@pytest.mark.unit
def test_connected_components_group_chains_and_leave_singletons_out():
    from indexer.audit import connected_components

    a, b = np.array([1, 2, 10, 7]), np.array([2, 3, 11, 7])
    assert sorted(connected_components(a, b).values()) == [[1, 2, 3], [10, 11]]


@pytest.mark.unit
def test_category_label_set_shares_leaves_and_splits_prompts():
    from indexer.audit import category_label_set

    label_set, label_of = category_label_set(["Men/Tops/Jackets", "Women/Tops/Jackets",
                                              "Women/Tops/Hoodies & Sweatshirts", "Gear/Bags"])
    assert label_set.names == ["Jackets", "Hoodies & Sweatshirts", "Bags"]
    assert label_of["Men/Tops/Jackets"] == label_of["Women/Tops/Jackets"] == "Jackets"
    assert label_set.labels[1].prompts == ("hoodies", "sweatshirts")


@pytest.mark.unit
def test_threshold_comes_from_option_then_calibration_then_default():
    from indexer.audit import DEFAULT_NEAR_DUPLICATE_MIN_COSINE, near_duplicate_threshold

    assert near_duplicate_threshold({"near_duplicate_min_cosine": 0.9}, 0.8) == (0.8, "option")
    assert near_duplicate_threshold({"near_duplicate_min_cosine": 0.9}, None) == (0.9, "calibration")
    assert near_duplicate_threshold({}, None) == (DEFAULT_NEAR_DUPLICATE_MIN_COSINE, "default")


@pytest.mark.unit
def test_bundled_model_ships_a_near_duplicate_calibration():
    cfg = json.loads((ROOT / "data/models/lookalike-base/open_clip_config.json").read_text())
    assert 0 < cfg["lookalike"]["calibration"]["near_duplicate_min_cosine"] < 1


@pytest.mark.unit
def test_large_flat_index_is_audited_through_a_graph_that_finds_the_same_pairs(monkeypatch):
    from indexer import ann, audit
    from indexer.vectors import VectorIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3000, 32)).astype(np.float32)
    vecs[1] = vecs[0] + 0.05 * rng.standard_normal(32)  # a near-duplicate pair: photos 0 and 1
    vecs[2000] = vecs[7] + 0.05 * rng.standard_normal(32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(len(vecs), dtype=np.int64)
    flat = VectorIndex(32)
    flat.replace(ann.build_index(ann.IndexSpec(ann.FLAT), vecs, ids), ann.IndexSpec(ann.FLAT), 3, ids)
    monkeypatch.setattr(audit, "EXACT_AUDIT_UP_TO", 1000)
    graph = audit.audit_index(flat)
    assert graph.spec.type == ann.HNSW and np.array_equal(graph.live_ids(), ids)
    found = {}
    for name, index in (("flat", flat), ("graph", graph)):
        a, b, s = audit.near_duplicate_pairs(index, [(ids, vecs)], lambda x: x, 0.95, neighbours=4)
        found[name] = set(zip(a.tolist(), b.tolist()))
    assert found["flat"] == found["graph"] == {(0, 1), (7, 2000)}
    monkeypatch.setattr(audit, "EXACT_AUDIT_UP_TO", 10_000)
    assert audit.audit_index(flat) is flat


# ------------------------------------------------------------------------ real index, tiny model
@pytest.mark.integration
def test_exact_duplicates_by_content_hash(dup_index):
    from indexer.audit import AuditOptions, run_audit
    from indexer.store import Store

    index, original = dup_index
    with Store.open(index) as store:
        report = run_audit(store, None, AuditOptions(parts=("exact_duplicates", "outliers")))
    assert report["counts"]["exact_duplicates"] == 1
    group = report["exact_duplicates"][0]
    assert group["products"] == sorted([original["id"], "FX-REUSED"])
    assert {p["source"] for p in group["photos"]} == {original["image"]}
    assert "near_duplicates" not in report and "category_disagreements" not in report


@pytest.mark.integration
def test_audit_limit_refuses_a_large_index(dup_index):
    from indexer.audit import AuditOptions, AuditTooLarge, run_audit
    from indexer.store import Store

    with Store.open(dup_index[0]) as store, pytest.raises(AuditTooLarge, match="at most 10"):
        run_audit(store, None, AuditOptions(max_photos=10))


# ------------------------------------------------------------------------ Magento, lookalike-base
@pytest.mark.integration
def test_planted_near_duplicates_are_one_group(magento_audit):
    report, truth = magento_audit
    assert report["thresholds"]["near_duplicate_threshold_source"] == "calibration"
    groups = [set(g["products"]) for g in report["near_duplicates"]]
    assert truth["near"] in groups, groups
    group = report["near_duplicates"][groups.index(truth["near"])]
    assert all(p["cosine"] >= report["thresholds"]["near_duplicate_min_cosine"] for p in group["pairs"])


@pytest.mark.integration
def test_copied_photo_is_an_exact_duplicate(magento_audit):
    report, truth = magento_audit
    assert truth["exact"] in [set(g["products"]) for g in report["exact_duplicates"]]


@pytest.mark.integration
def test_planted_wrong_categories_are_flagged_first(magento_audit):
    report, truth = magento_audit
    flagged = [f["product_id"] for f in report["category_disagreements"]]
    assert truth["wrong"] <= set(flagged), flagged
    margins = [f["margin"] for f in report["category_disagreements"]]
    assert margins == sorted(margins, reverse=True)
    watch = next(f for f in report["category_disagreements"] if f["catalogue_label"] == "Pants")
    assert watch["predicted_label"] == "Watches" and watch["photos"]


# ------------------------------------------------------------------------ CLI
@pytest.mark.system
def test_cli_writes_json_csv_and_a_self_contained_html(dup_index, tmp_path):
    index, original = dup_index
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "indexer.cli", "audit", str(index), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["exact_duplicates"] == 1
    csv_text = (out / "report.csv").read_text()
    assert csv_text.splitlines()[0].startswith("part,finding,product_id")
    assert "FX-REUSED" in csv_text
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert 'data-part="exact_duplicates"' in page and "FX-REUSED" in page


@pytest.mark.system
def test_cli_bad_option_is_one_line_not_a_traceback(dup_index):
    r = subprocess.run([sys.executable, "-m", "indexer.cli", "audit", str(dup_index[0]), "--parts", "spelling"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2
    assert "unknown audit parts" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------ API
@pytest.mark.integration
def test_api_needs_a_key_when_keys_are_set_and_rejects_bad_parameters(dup_index, tiny_model):
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(dup_index[0], model=tiny_model, api_keys=KEY)) as client:
        assert client.get("/v1/audit").status_code == 401
        assert client.get("/v1/audit", headers={"Authorization": "Bearer wrong"}).status_code == 403
        auth = {"Authorization": f"Bearer {KEY}"}
        r = client.get("/v1/audit", headers=auth)
        assert r.status_code == 200
        body = r.json()
        assert body["counts"]["exact_duplicates"] == 1
        photo = body["exact_duplicates"][0]["photos"][0]
        assert photo["image"].startswith("/v1/products/") and "source" not in photo
        assert str(dup_index[0]) not in r.text  # no server paths
        bad = client.get("/v1/audit?near_duplicate_min_cosine=2", headers=auth)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
        bad = client.get("/v1/audit?parts=spelling", headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_audit"
        assert "/v1/audit" in client.get("/openapi.json").json()["paths"]
    with TestClient(create_app(dup_index[0], model=tiny_model)) as client:
        assert client.get("/v1/audit?parts=exact_duplicates").status_code == 200  # no keys: open like search


@pytest.fixture(scope="module")
def live_server(dup_index):
    with served(dup_index[0], {"LOOKALIKE_ACCESS_LOG": "false"}) as base:
        yield base


@pytest.mark.system
def test_real_server_refuses_an_audit_over_the_photo_limit(dup_index):
    with served(dup_index[0], {"LOOKALIKE_AUDIT_MAX_PHOTOS": "10", "LOOKALIKE_ACCESS_LOG": "false"}) as base:
        r = httpx.get(base + "/v1/audit", timeout=60)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "audit_too_large"
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200


@pytest.mark.system
def test_audit_page_renders_findings_in_chromium(live_server, tmp_path):
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(live_server + "/")
        page.click("#audit-link")
        page.wait_for_selector('#exact_duplicates .finding[data-part="exact_duplicates"]')
        finding = page.locator("#exact_duplicates .finding").first
        assert "2 products share one photo file" in finding.inner_text()
        assert "FX-REUSED" in finding.inner_text()
        page.wait_for_function("[...document.querySelectorAll('#exact_duplicates img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#exact_duplicates img").count() == 2
        assert "products, " in page.inner_text("#status")
        page.evaluate("document.querySelector('#audit-form').noValidate = true")  # let the server judge it
        page.fill("#near-dup", "2")  # out of range: the server's 422 is shown in plain words
        page.click("#audit-form button")
        page.wait_for_selector("#error:not([hidden])")
        assert "near_duplicate_min_cosine" in page.inner_text("#error")
        page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)
        browser.close()
    assert errors == []
