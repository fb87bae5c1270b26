"""HTTP API through FastAPI's TestClient, on an index of real Magento photos (the search knobs of
approximate indexes on a synthetic one)."""
import hashlib
import io
import json
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.ann import MAX_EF_SEARCH, MAX_NPROBE
from server.app import create_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(fixture_index, tiny_model):
    app = create_app(fixture_index, model=tiny_model, max_upload_bytes=2 * 1024 * 1024)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def catalogue_rows(fixture_catalogue):
    return [json.loads(line) for line in fixture_catalogue.read_text().splitlines()]


def _jpeg(path) -> bytes:
    return open(path, "rb").read()


def _shared(rows):
    """Photos whose file belongs to one product only (some Magento files are shared by several)."""
    owners = {}
    for r in rows:
        owners.setdefault(r["image"], set()).add(r["id"])
    return [r for r in rows if len(owners[r["image"]]) == 1]


def test_image_search_finds_the_photos_own_product(client, catalogue_rows):
    for row in _shared(catalogue_rows)[::40]:
        r = client.post("/v1/search/image?k=5", files={"image": ("q.jpg", _jpeg(row["image"]), "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        first = body["results"][0]
        assert first["id"] == row["id"]
        assert first["score"] >= 0.99
        # says which photo matched: a URL of this server (never a server path) for that photo id,
        # whose stored content hash is the query file's
        assert first["image"] == f"/v1/products/{quote(first['id'], safe='')}/image?photo_id={first['photo_id']}"
        photos = {p["photo_id"]: p for p in client.get(f"/v1/products/{quote(first['id'], safe='')}").json()["images"]}
        assert photos[first["photo_id"]]["sha256"] == hashlib.sha256(_jpeg(row["image"])).hexdigest()
        assert first["title"] == row["title"] and first["category"] == row["category"]
        assert len(body["results"]) == 5
        assert len({x["id"] for x in body["results"]}) == 5  # products, not photos
        assert sum(lab["score"] for lab in body["labels"]) <= 1.0 + 1e-6
        assert body["took_ms"] > 0


def test_image_search_options(client, catalogue_rows):
    row = _shared(catalogue_rows)[0]
    files = {"image": ("q.jpg", _jpeg(row["image"]), "image/jpeg")}
    r = client.post("/v1/search/image?k=3&labels=false&category=Gear", files=files).json()
    assert r["labels"] == []
    assert r["results"] and all(x["category"].startswith("Gear/") for x in r["results"])
    r = client.post("/v1/search/image?k=50&min_score=0.999", files=files).json()
    assert all(x["score"] >= 0.999 for x in r["results"])


def test_text_search_returns_k_results(client):
    r = client.post("/v1/search/text", json={"query": "red running shoes", "k": 7})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 7
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    r = client.post("/v1/search/text", json={"query": "hoodie", "k": 5, "category": "Women/Tops"})
    assert all(x["category"].startswith("Women/Tops") for x in r.json()["results"])


def test_labels_sum_to_one_and_accept_custom_labels(client, catalogue_rows):
    img = _jpeg(catalogue_rows[0]["image"])
    r = client.post("/v1/labels?k=100", files={"image": ("q.jpg", img, "image/jpeg")})
    assert r.status_code == 200
    labels = r.json()["labels"]
    assert sum(lab["score"] for lab in labels) == pytest.approx(1.0, abs=1e-4)
    r = client.post("/v1/labels", files={"image": ("q.jpg", img, "image/jpeg")}, data={"labels": "hoodie, dress,watch"})
    assert sorted(lab["label"] for lab in r.json()["labels"]) == ["dress", "hoodie", "watch"]
    r = client.post("/v1/labels", files={"image": ("q.jpg", img, "image/jpeg")}, data={"labels": ["hoodie", "bag"]})
    assert sorted(lab["label"] for lab in r.json()["labels"]) == ["bag", "hoodie"]
    assert r.json()["closed_set"] is False
    # a closed set needs >= 100 catalogue photos (this one has fewer): plain cosines, and it says so
    closed = client.post("/v1/labels?closed_set=true", files={"image": ("q.jpg", img, "image/jpeg")},
                         data={"labels": ["hoodie", "bag"]})
    assert closed.status_code == 200 and closed.json()["closed_set"] is False
    assert closed.json()["labels"] == r.json()["labels"]


def test_products_similar_and_images(client, catalogue_rows):
    pid = catalogue_rows[0]["id"]
    p = client.get(f"/v1/products/{pid}").json()
    assert p["id"] == pid and p["images"]
    assert len(p["images"]) == len({r["image"] for r in catalogue_rows if r["id"] == pid})
    for photo in p["images"]:  # photo URLs, which serve the photo
        assert photo["image"] == f"/v1/products/{quote(pid, safe='')}/image?photo_id={photo['photo_id']}"
    assert client.get(p["images"][-1]["image"] + "&size=32").status_code == 200
    sim = client.get(f"/v1/products/{pid}/similar?k=4").json()["results"]
    assert len(sim) == 4 and pid not in {x["id"] for x in sim}
    r = client.get(f"/v1/products/{pid}/image?size=64")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 64
    assert "max-age" in r.headers["cache-control"]


@pytest.mark.parametrize(
    "method, url, kwargs, status, code",
    [
        ("post", "/v1/search/image", {"files": {"image": ("a.txt", b"just some text", "image/jpeg")}}, 400, "not_an_image"),
        ("post", "/v1/search/image", {"files": {"image": ("a.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ("post", "/v1/search/image", {}, 422, "validation_error"),
        ("post", "/v1/search/image?k=0", {"files": {"image": ("a.jpg", b"x", "image/jpeg")}}, 422, "validation_error"),
        ("post", "/v1/search/image?k=abc", {"files": {"image": ("a.jpg", b"x", "image/jpeg")}}, 422, "validation_error"),
        ("post", "/v1/search/image?min_score=7", {"files": {"image": ("a.jpg", b"x", "image/jpeg")}}, 422, "validation_error"),
        ("post", "/v1/search/image", {"files": {"image": ("a.jpg", b"\xff\xd8" + b"0" * (3 * 1024 * 1024), "image/jpeg")}}, 413, "too_large"),
        ("post", "/v1/search/text", {"json": {"query": ""}}, 422, "validation_error"),
        ("post", "/v1/search/text", {"json": {"k": 3}}, 422, "validation_error"),
        ("post", "/v1/search/text", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "validation_error"),
        ("post", "/v1/labels", {"files": {"image": ("a.png", b"GIF89a", "image/png")}}, 400, None),
        ("get", "/v1/products/NO-SUCH-PRODUCT", {}, 404, "not_found"),
        ("get", "/v1/products/NO-SUCH-PRODUCT/similar", {}, 404, "not_found"),
        ("get", "/v1/products/NO-SUCH-PRODUCT/image", {}, 404, "not_found"),
        ("get", "/v1/nothing-here", {}, 404, "not_found"),
    ],
)
def test_bad_input_gets_4xx_json(client, method, url, kwargs, status, code):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code


def test_one_label_is_refused(client, catalogue_rows):
    img = _jpeg(catalogue_rows[0]["image"])
    r = client.post("/v1/labels", files={"image": ("q.jpg", img, "image/jpeg")}, data={"labels": "hoodie"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_labels"


def test_messy_uploads_never_500(client, datasets_dir):
    statuses = {}
    for f in sorted((datasets_dir / "messy-images").iterdir()):
        r = client.post("/v1/search/image?k=3", files={"image": (f.name, f.read_bytes(), "image/jpeg")})
        statuses[f.name] = r.status_code
        assert r.status_code < 500, (f.name, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["code"]
    assert statuses["hopper_orientation_6.jpg"] == 200
    assert statuses["decompression_bomb.gif"] == 413
    assert statuses["truncated_jpeg.jpg"] == 400
    assert client.get("/healthz").status_code == 200


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for route in ("/v1/search/image", "/v1/search/text", "/v1/labels", "/v1/products/{product_id}",
                  "/v1/products/{product_id}/similar", "/healthz"):
        assert route in paths, sorted(paths)
        for op in paths[route].values():
            assert op.get("summary")
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- approximate-index knobs


@pytest.fixture(scope="module")
def hnsw_app_client(tmp_path_factory, tiny_model):
    """The app over a synthetic 300-product index with a forced HNSW index (no datasets needed)."""
    from indexer.store import PhotoRecord, Product, Store

    path = tmp_path_factory.mktemp("api") / "idx"
    vecs = np.random.default_rng(0).standard_normal((300, tiny_model.identity.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Store.create(path, tiny_model.identity) as store:
        store.set_index_choice("hnsw")
        with store.transaction() as tx:
            tx.upsert_products([Product(f"p{i}", f"product {i}", "Gear") for i in range(300)])
            tx.add_photos([PhotoRecord(f"p{i}", f"/photos/{i}.jpg", f"{i:064x}", v) for i, v in enumerate(vecs)])
        store.save()
    with TestClient(create_app(path, model=tiny_model)) as client:
        yield client


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_search_routes_accept_knobs_in_range(hnsw_app_client):
    c = hnsw_app_client
    r = c.post("/v1/search/text", json={"query": "red shoes", "k": 5, "ef_search": 8, "nprobe": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 5, r.text
    r = c.post("/v1/search/image?k=5&ef_search=300&labels=false", files={"image": ("q.png", _png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["results"]) == 5, r.text
    r = c.get("/v1/products/p1/similar?k=4&ef_search=16&nprobe=2")
    assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text
    assert "p1" not in {x["id"] for x in r.json()["results"]}


@pytest.mark.parametrize("knob, value", [("ef_search", 0), ("ef_search", MAX_EF_SEARCH + 1), ("nprobe", 0),
                                         ("nprobe", MAX_NPROBE + 1)])
def test_search_routes_reject_knobs_out_of_range(hnsw_app_client, knob, value):
    c = hnsw_app_client
    responses = [
        c.post("/v1/search/text", json={"query": "red shoes", knob: value}),
        c.post(f"/v1/search/image?{knob}={value}", files={"image": ("q.png", _png(), "image/png")}),
        c.get(f"/v1/products/p1/similar?{knob}={value}"),
    ]
    for r in responses:
        assert r.status_code == 422, r.text
        assert knob in r.json()["error"]["message"]
