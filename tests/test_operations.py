"""Operators' view: readiness, Prometheus metrics, JSON request logs, settings from env and TOML."""
import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from indexer.store import Store
from server.app import create_app
from server.observability import JsonFormatter
from server.settings import ServerSettings

pytestmark = pytest.mark.integration


def test_readyz_is_503_until_loaded_then_200(fixture_index, tiny_model, monkeypatch):
    gate = threading.Event()
    real_open = Store.open

    def slow_open(*a, **k):
        gate.wait(30)
        return real_open(*a, **k)

    monkeypatch.setattr(Store, "open", slow_open)
    app = create_app(fixture_index, model=tiny_model, background_load=True)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = c.post("/v1/search/text", json={"query": "bag"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert "lookalike_ready 0.0" in c.get("/metrics").text
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["products"] > 0 and ready["model"] == "test-tiny"
        assert c.post("/v1/search/text", json={"query": "bag"}).status_code == 200


def test_load_failure_is_reported_by_readyz(fixture_index, tmp_path):
    from indexer.model import load_model

    other = load_model("ViT-B-32", "none", "cpu")  # random weights: not the index's model
    app = create_app(fixture_index, model=other, background_load=True)
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while app.state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "was built with model test-tiny" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def client(fixture_index, tiny_model):
    with TestClient(create_app(fixture_index, model=tiny_model)) as c:
        yield c


def test_metrics_count_requests_latency_embedding_and_index_size(client, fixture_catalogue):
    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    photo = open(rows[0]["image"], "rb").read()
    for _ in range(3):
        assert client.post("/v1/search/text", json={"query": "watch", "k": 3}).status_code == 200
    assert client.post("/v1/search/image", files={"image": ("q.jpg", photo, "image/jpeg")}).status_code == 200
    assert client.get("/v1/products/NOPE").status_code == 404
    text = client.get("/metrics").text
    assert 'lookalike_http_requests_total{method="POST",route="/v1/search/text",status="200"} 3.0' in text
    assert 'lookalike_http_requests_total{method="GET",route="/v1/products/{product_id:path}",status="404"} 1.0' in text
    assert 'lookalike_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/v1/search/image"}' in text
    assert 'lookalike_embed_seconds_count{kind="image"} 1.0' in text
    assert 'lookalike_embed_seconds_count{kind="text"} 3.0' in text
    assert "lookalike_search_seconds_count 4.0" in text
    assert 'lookalike_embed_batch_size_count{kind="image"} 1.0' in text
    n_products = len({r["id"] for r in rows})
    assert f"lookalike_index_products {float(n_products)}" in text
    assert f"lookalike_index_photos {float(len(rows))}" in text
    assert 'lookalike_model_info{dim="64"' in text and 'name="test-tiny"' in text
    assert "lookalike_ready 1.0" in text


def test_one_json_log_line_per_request_with_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger="lookalike.access"):
        r = client.get("/v1/categories", headers={"x-request-id": "abc123"})
        r2 = client.get("/v1/products/NOPE")
    assert r.headers["x-request-id"] == "abc123"
    assert len(r2.headers["x-request-id"]) == 32
    records = [rec for rec in caplog.records if rec.name == "lookalike.access"]
    assert len(records) == 2
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["msg"] == "request" and line["request_id"] == "abc123"
    assert line["route"] == "/v1/categories" and line["status"] == 200 and line["method"] == "GET"
    assert line["duration_ms"] >= 0 and line["level"] == "info"
    second = json.loads(JsonFormatter().format(records[1]))
    assert second["status"] == 404 and second["request_id"] == r2.headers["x-request-id"]


def test_categories_route(client, fixture_catalogue):
    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    cats = client.get("/v1/categories").json()
    assert {c["category"] for c in cats} == {r["category"] for r in rows}
    assert sum(c["products"] for c in cats) == len({r["id"] for r in rows})


def test_thumbnails_are_cached_with_etag(client, fixture_catalogue):
    pid = json.loads(fixture_catalogue.read_text().splitlines()[0])["id"]
    r = client.get(f"/v1/products/{pid}/image?size=96")
    assert r.status_code == 200 and r.headers["etag"]
    again = client.get(f"/v1/products/{pid}/image?size=96", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_settings_from_environment_and_toml(fixture_index, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_MAX_UPLOAD_BYTES", "1000")
    toml = tmp_path / "lookalike.toml"
    toml.write_text('log_format = "text"\nmax_pixels = 5000\nthumbnail_cache_items = 3\n')
    monkeypatch.setenv("LOOKALIKE_CONFIG", str(toml))
    s = ServerSettings()
    assert (s.max_upload_bytes, s.log_format, s.max_pixels, s.thumbnail_cache_items) == (1000, "text", 5000, 3)
    monkeypatch.setenv("LOOKALIKE_MAX_PIXELS", "7000")  # the environment wins over the file
    assert ServerSettings().max_pixels == 7000
    with TestClient(create_app(fixture_index, model=tiny_model)) as c:
        r = c.post("/v1/search/image", files={"image": ("q.jpg", b"\xff\xd8" + b"0" * 2000, "image/jpeg")})
        assert r.status_code == 413


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>lookalike" in r.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
