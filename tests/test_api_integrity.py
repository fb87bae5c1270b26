"""What the write routes store can always be read back: uploaded photos live in the index
directory (whatever the server's working directory), bad metadata is refused before anything
commits, every read survives whatever an older version stored, and public answers carry URLs,
never server paths."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import Store
from server.app import create_app

pytestmark = pytest.mark.integration

KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 80), color).save(buf, "PNG")
    return buf.getvalue()


def _add(c, pid, photos, name="p.png", **meta):
    files = [("images", (name, data, "application/octet-stream")) for data in photos]
    return c.post("/v1/products", data={"metadata": json.dumps({"id": pid, **meta})}, files=files or None, headers=AUTH)


def _uploads(index: Path) -> list[str]:
    folder = index / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_uploads_live_in_the_index_directory_whatever_the_working_directory(index_copy, tiny_model, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(index_copy.parent)
    with TestClient(create_app(Path("index"), model=tiny_model, api_keys=KEY)) as c:  # a relative index path
        r = _add(c, "UP-1", [_png((200, 30, 30))], name="evil.sh")
        assert r.status_code == 201, r.text
        image_url = r.json()["images"][0]["image"]
    (name,) = _uploads(index_copy)
    assert name.endswith(".png")  # named from the detected format, not the client's ".sh"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with TestClient(create_app(index_copy, model=tiny_model)) as c:
        r = c.get(image_url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Store.open(index_copy) as store:
        assert store.check()["ok"]
    (index_copy / "uploads" / name).unlink()
    with Store.open(index_copy) as store:
        report = store.check()
        assert not report["ok"] and any("uploaded photos are missing" in p for p in report["problems"])


def test_deleted_and_replaced_photos_leave_no_files(index_copy, tiny_model):
    red, green, blue = _png((220, 0, 0)), _png((0, 220, 0)), _png((0, 0, 220))
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        assert _add(c, "A", [red, green]).status_code == 201
        assert _add(c, "B", [red]).status_code == 201  # the same bytes: one file, two references
        assert len(_uploads(index_copy)) == 2
        assert _add(c, "A", [blue]).status_code == 200  # replaces A's photos: green goes, red stays (B)
        assert len(_uploads(index_copy)) == 2
        assert c.delete("/v1/products/B", headers=AUTH).status_code == 204
        assert len(_uploads(index_copy)) == 1
        assert c.delete("/v1/products/A", headers=AUTH).status_code == 204
        assert _uploads(index_copy) == []
    with Store.open(index_copy) as store:
        report = store.check()
        assert report["ok"] and not any("belong to no photo" in n for n in report["notes"])


@pytest.mark.parametrize("metadata, why", [
    ('{"id": "M1", "price": NaN}', "finite"),
    ('{"id": "M1", "price": 1e999}', "finite"),
    ('{"id": "M1", "deep": ' + "[" * 900 + "]" * 900 + "}", "nested"),
    ('{"id": "M1", "title": "\\ud83d broken emoji"}', "surrogate"),
    ('{"id": "M1", "note": "\\ud83d"}', "surrogate"),
    ('{"id": "M1", "big": "' + "x" * 70_000 + '"}', "bytes"),
    ('{"id": "M1/image"}', "may not end with"),
    ('{"id": "a/b/similar"}', "may not end with"),
])
def test_bad_metadata_is_refused_before_anything_commits(index_copy, tiny_model, metadata, why):
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        before = c.get("/readyz").json()["products"]
        files = [("images", ("p.png", _png((1, 2, 3)), "image/png"))]
        r = c.post("/v1/products", data={"metadata": metadata}, files=files, headers=AUTH)
        assert r.status_code == 422, r.text
        assert why in r.json()["error"]["message"]
        assert c.get("/readyz").json()["products"] == before
    assert _uploads(index_copy) == []


def test_patch_validates_the_merged_product(index_copy, tiny_model):
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        assert _add(c, "P1", [_png((9, 90, 9))], price=3).status_code == 201
        nested = {"a": None}
        for _ in range(20):
            nested = {"a": nested}
        for body in ({"metadata": nested}, {"metadata": {"x": "\ud800"}}, {"title": "t" * 2001}):
            r = c.patch("/v1/products/P1", content=json.dumps(body),
                        headers={**AUTH, "content-type": "application/json"})
            assert r.status_code == 422, r.text
        r = c.patch("/v1/products/P1", content='{"metadata": {"x": Infinity}}',
                    headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert c.get("/v1/products/P1").json()["metadata"] == {"price": 3}


def test_reads_survive_whatever_is_stored(index_copy, tiny_model):
    """An index written by an older version may hold metadata that cannot go into a JSON answer
    as is (NaN, infinity, nesting past the serializer's limit): every read route still answers."""
    with Store.open(index_copy, writable=True) as store:
        pid = store.product_ids()[0]
        deep = "[" * 900 + "]" * 900
        with store.transaction() as tx:
            tx.db.execute("UPDATE products SET metadata = ? WHERE id = ?",
                          (f'{{"price": NaN, "big": 1e999, "deep": {deep}}}', pid))
            tx.db.execute("UPDATE photos SET metadata = '{\"v\": -Infinity}' WHERE product_id = ?", (pid,))
            tx.changed = True
        vec = store.product_vectors(pid)
    with TestClient(create_app(index_copy, model=tiny_model)) as c:
        r = c.get(f"/v1/products/{pid}")
        assert r.status_code == 200, r.text
        assert r.json()["metadata"] in ({}, {"price": None, "big": None})
        r = c.get(f"/v1/products/{pid}/similar")
        assert r.status_code == 200, r.text
        other = r.json()["results"][0]["id"]
        r = c.get(f"/v1/products/{other}/similar?k=1000")
        assert r.status_code == 200 and pid in [x["id"] for x in r.json()["results"]]
    assert vec.shape[0] >= 1


def test_public_answers_carry_urls_not_server_paths(index_copy, tiny_model):
    with TestClient(create_app(index_copy, model=tiny_model)) as c:
        r = c.post("/v1/search/text", json={"query": "bag", "k": 5})
        results = r.json()["results"]
        assert results and all(x["image"].startswith("/v1/products/") for x in results)
        assert not any(str(index_copy.parent) in json.dumps(x) for x in results)
        assert c.get(results[0]["image"] + "&size=64").status_code == 200
        product = c.get(f"/v1/products/{results[0]['id']}").json()
        assert all(p["image"].startswith("/v1/products/") for p in product["images"])


def test_catalogue_rows_with_route_suffix_ids_are_reported(tmp_path):
    """The rule the API applies to ids holds for catalogue rows too: every stored id can be read."""
    from indexer.catalogue import read_catalogue

    photo = tmp_path / "p.png"
    photo.write_bytes(_png((5, 5, 5)))
    manifest = tmp_path / "c.jsonl"
    rows = [{"id": pid, "image": str(photo)} for pid in ("ok", "x/image", "y/similar")]
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    cat = read_catalogue(manifest)
    assert sorted(cat.products) == ["ok"]
    assert sorted(p.reason for p in cat.problems) == ["bad_id", "bad_id"]


def test_out_of_memory_in_a_request_is_a_413(index_copy, tiny_model, monkeypatch):
    from indexer import updates

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(updates, "image_from_bytes", no_memory)
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        r = c.post("/v1/search/image", files={"image": ("q.png", _png((1, 1, 1)), "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert _add(c, "MEM", [_png((2, 2, 2))]).status_code == 413
        assert c.get("/healthz").status_code == 200


def test_metadata_nested_past_the_json_parser_is_a_422(index_copy, tiny_model):
    """100,000 nested brackets pass the body limits but exhaust json's recursion: a 422, never a 500."""
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        files = [("images", ("p.png", _png((4, 5, 6)), "image/png"))]
        deep = '{"id": "D", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        r = c.post("/v1/products", data={"metadata": deep}, files=files, headers=AUTH)
        assert r.status_code == 422 and "nested" in r.json()["error"]["message"]
        body = '{"metadata": {"x": ' + "[" * 30_000 + "]" * 30_000 + "}}"
        r = c.patch("/v1/products/D", content=body, headers={**AUTH, "content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
