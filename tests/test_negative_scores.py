"""A photo with a negative cosine is unlike the query, not a lesser match: image searches and
"similar" leave such products out unless the caller asks for them (min_score=-1)."""
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import Store
from server.app import create_app

pytestmark = pytest.mark.integration


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


def test_image_search_and_similar_leave_out_negative_cosines(fixture_index, tiny_model, monkeypatch):
    with Store.open(fixture_index) as store:
        n = store.count_products()
        pid = store.product_ids()[0]
        # the tiny random-weight model puts every photo in one narrow cone: a query along the
        # difference of two photos from their mean is like some products and unlike others
        mean = np.mean([v for _, vs in store.iter_products() for v in vs], axis=0)
        query = (store.product_vectors(pid)[:1] - mean).astype(np.float32)
        query /= np.linalg.norm(query)
        everything = store.search(query, k=n)[0]
    assert any(h.score < 0 for h in everything) and any(h.score > 0 for h in everything)
    app = create_app(fixture_index, model=tiny_model)
    with TestClient(app) as c:
        monkeypatch.setattr(app.state.engine, "embed_upload", lambda data, box=None: query)
        files = {"image": ("q.png", _png(), "image/png")}
        default = c.post(f"/v1/search/image?k={n}", files=files).json()["results"]
        assert default and all(r["score"] >= 0 for r in default)
        assert len(default) == sum(h.score >= 0 for h in everything)
        every = c.post(f"/v1/search/image?k={n}&min_score=-1", files=files).json()["results"]
        assert len(every) == n and every[0]["id"] == pid and every[-1]["score"] < 0
        assert c.post(f"/v1/search/image?k={n}&min_score=-1.5", files=files).status_code == 422


def test_similar_and_cli_take_min_score(fixture_index, tiny_model):
    from indexer.cli import build_parser

    with Store.open(fixture_index) as store:
        pid, n = store.product_ids()[0], store.count_products()
        all_similar = store.similar(pid, k=n, min_score=-1)
    cut = sorted(h.score for h in all_similar)[len(all_similar) // 2]
    with TestClient(create_app(fixture_index, model=tiny_model)) as c:
        kept = c.get(f"/v1/products/{pid}/similar?k={n}&min_score={cut}").json()["results"]
    assert kept and all(r["score"] >= cut for r in kept) and len(kept) < len(all_similar)
    assert build_parser().parse_args(["search", "idx", "--image", "q.jpg", "--min-score", "-0.5"]).min_score == -0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "idx", "--image", "q.jpg", "--min-score", "2"])
