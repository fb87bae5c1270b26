"""Live catalogue updates over HTTP and the CLI: auth, upsert/patch/delete, durability, and
searches running concurrently with writes."""
import io
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import Store
from server.app import create_app

from conftest import LiveServer

pytestmark = pytest.mark.system

KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def _photo(color, size=(300, 400), shape=0) -> bytes:
    im = Image.new("RGB", size, (255, 255, 255))
    im.paste(Image.new("RGB", (120 + 40 * shape, 200 - 30 * shape), color), (60, 80))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _add(c, pid, photos, **meta):
    files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    return c.post("/v1/products", data={"metadata": json.dumps({"id": pid, **meta})}, files=files or None, headers=AUTH)


def test_write_routes_need_a_valid_key(index_copy, tiny_model):
    photo = _photo((200, 0, 0))
    with TestClient(create_app(index_copy, model=tiny_model)) as c:  # no keys configured
        r = _add(c, "N1", [photo], title="t")
        assert r.status_code == 403 and r.json()["error"]["code"] == "writes_disabled"
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=f"other,{KEY}")) as c:
        files = {"images": ("p.jpg", photo, "image/jpeg")}
        r = c.post("/v1/products", data={"metadata": '{"id": "N1"}'}, files=files)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/products", data={"metadata": '{"id": "N1"}'}, files=files, headers={"authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.delete("/v1/products/N1", headers={"authorization": "Basic x"}).status_code == 401
        assert c.post("/v1/search/text", json={"query": "bag"}).status_code == 200  # reads stay open
        assert _add(c, "N1", [photo], title="t").status_code == 201
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY, auth_reads=True)) as c:
        assert c.post("/v1/search/text", json={"query": "bag"}).status_code == 401
        assert c.post("/v1/search/text", json={"query": "bag"}, headers=AUTH).status_code == 200
        assert c.get("/v1/products/N1", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_upsert_patch_delete_and_durability(index_copy, tiny_model):
    red, blue, green = _photo((220, 20, 20)), _photo((20, 20, 220), shape=2), _photo((20, 200, 20), shape=1)
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        before = c.get("/readyz").json()["products"]
        r = _add(c, "NEW-1", [red, blue], title="Red thing", category="Test/Things", price=9.5)
        assert r.status_code == 201, r.text
        p = r.json()
        assert len(p["images"]) == 2 and p["metadata"] == {"price": 9.5} and p["category"] == "Test/Things"
        hit = c.post("/v1/search/image?k=1", files={"image": ("q.jpg", blue, "image/jpeg")}).json()["results"][0]
        assert hit["id"] == "NEW-1" and hit["score"] >= 0.99
        assert c.get(f"/v1/products/NEW-1/image?photo_id={hit['photo_id']}").status_code == 200

        r = _add(c, "NEW-1", [green], title="Green thing")  # replace: photos and metadata
        assert r.status_code == 200
        assert len(r.json()["images"]) == 1 and r.json()["title"] == "Green thing"
        top = c.post("/v1/search/image?k=3", files={"image": ("q.jpg", blue, "image/jpeg")}).json()["results"]
        assert all(not (x["id"] == "NEW-1" and x["score"] > 0.9999) for x in top)  # the old photo is gone

        r = c.patch("/v1/products/NEW-1", json={"category": "Test/Other", "metadata": {"price": 3, "colour": "green"}},
                    headers=AUTH)
        assert r.status_code == 200 and r.json()["metadata"] == {"price": 3, "colour": "green"}
        r = c.patch("/v1/products/NEW-1", json={"metadata": {"colour": None}}, headers=AUTH)
        assert r.json()["metadata"] == {"price": 3} and r.json()["category"] == "Test/Other"
        assert c.patch("/v1/products/NOPE", json={"title": "x"}, headers=AUTH).status_code == 404

        assert _add(c, "NEW-2", [red], title="Red").status_code == 201
        assert c.delete("/v1/products/NEW-2", headers=AUTH).status_code == 204
        assert c.delete("/v1/products/NEW-2", headers=AUTH).status_code == 404
        assert c.get("/v1/products/NEW-2").status_code == 404
        hits = c.post("/v1/search/image?k=50", files={"image": ("q.jpg", red, "image/jpeg")}).json()["results"]
        assert "NEW-2" not in {h["id"] for h in hits}
        assert c.get("/readyz").json()["products"] == before + 1
    # acknowledged writes survive a restart, and the store is consistent
    with Store.open(index_copy) as store:
        assert store.has_product("NEW-1") and not store.has_product("NEW-2")
        assert store.get_product("NEW-1")["metadata"] == {"price": 3}
        assert store.check()["ok"], store.check()["problems"]


def test_bad_writes_change_nothing(index_copy, tiny_model):
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        count = c.get("/readyz").json()["photos"]
        cases = [
            (_add(c, "B1", [_photo((1, 2, 3)), b"not an image"], title="x"), 400),
            (_add(c, "B2", [], title="new product without photos"), 400),
            (c.post("/v1/products", data={"metadata": "{nope"}, headers=AUTH), 422),
            (c.post("/v1/products", data={"metadata": "[1]"}, headers=AUTH), 422),
            (_add(c, "", [_photo((1, 2, 3))]), 422),  # a bad id is invalid metadata, like a bad title
            (_add(c, "B3", [_photo((1, 2, 3))], title=5), 422),
            (c.post("/v1/products", files={"images": ("a.jpg", b"x", "image/jpeg")}, headers=AUTH), 422),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert response.json()["error"]["message"]
        assert c.get("/readyz").json()["photos"] == count
        assert c.get("/v1/products/B1").status_code == 404


def test_read_only_and_locked_index_refuse_writes(index_copy, tiny_model):
    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY, read_only=True)) as c:
        r = _add(c, "R1", [_photo((9, 9, 9))])
        assert r.status_code == 403 and r.json()["error"]["code"] == "read_only"
    with Store.open(index_copy, writable=True):  # e.g. 'lookalike index' running
        with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
            assert c.post("/v1/search/text", json={"query": "bag"}).status_code == 200
            r = _add(c, "R1", [_photo((9, 9, 9))])
            assert r.status_code == 409 and r.json()["error"]["code"] == "index_locked"


def test_cli_add_and_delete(index_copy, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "lookalike")
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_photo((10, 120, 200)))
    r = subprocess.run([exe, "add", str(index_copy), str(photo), "--id", "CLI-1", "--title", "From CLI",
                        "--meta", "price=12"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Store.open(index_copy) as store:
        p = store.get_product("CLI-1")
        assert p["title"] == "From CLI" and p["metadata"] == {"price": "12"} and p["images"][0]["image"] == str(photo)
    r = subprocess.run([exe, "delete", str(index_copy), "CLI-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "delete", str(index_copy), "CLI-1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no product with id 'CLI-1'" in r.stderr
    r = subprocess.run([exe, "check", str(index_copy)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout


def test_searches_concurrent_with_writes_never_fail_or_see_deleted(index_copy, tiny_model):
    live = LiveServer(create_app(index_copy, model=tiny_model, api_keys=KEY, snapshot_interval_s=0.5)).__enter__()
    base = live.url
    photos = [_photo((30 * i % 255, 90, 200 - 20 * i % 255), shape=i % 3) for i in range(6)]
    deleted_at: dict[str, float] = {}
    problems: list[str] = []
    stop = threading.Event()
    acknowledged: list[str] = []

    def writer(n: int) -> None:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            for i in range(8):
                pid = f"LIVE-{n}-{i}"
                files = [("images", ("p.jpg", photos[(n + i) % 6], "image/jpeg"))]
                r = c.post("/v1/products", data={"metadata": json.dumps({"id": pid, "title": "live"})}, files=files)
                if r.status_code != 201:
                    problems.append(f"add {pid}: {r.status_code} {r.text}")
                    continue
                if i % 2:
                    r = c.delete(f"/v1/products/{pid}")
                    if r.status_code != 204:
                        problems.append(f"delete {pid}: {r.status_code}")
                    deleted_at[pid] = time.monotonic()
                else:
                    acknowledged.append(pid)

    def searcher(n: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while not stop.is_set():
                started = time.monotonic()
                if n % 2:
                    r = c.post("/v1/search/image?k=30", files={"image": ("q.jpg", photos[n % 6], "image/jpeg")})
                else:
                    r = c.post("/v1/search/text", json={"query": "live", "k": 30})
                if r.status_code != 200:
                    problems.append(f"search: {r.status_code} {r.text}")
                    continue
                for hit in r.json()["results"]:
                    gone = deleted_at.get(hit["id"])
                    if gone is not None and gone < started:
                        problems.append(f"search returned {hit['id']}, deleted before the search started")
                    if hit["id"].startswith("LIVE-") and hit["title"] != "live":
                        problems.append(f"half-written product {hit['id']}: {hit}")

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    searchers = [threading.Thread(target=searcher, args=(n,)) for n in range(4)]
    for t in writers + searchers:
        t.start()
    for t in writers:
        t.join(timeout=300)
    stop.set()
    for t in searchers:
        t.join(timeout=60)
    live.__exit__(None, None, None)
    assert problems == []
    assert len(acknowledged) == 8 and len(deleted_at) == 8
    with Store.open(index_copy) as store:
        for pid in acknowledged:
            assert store.has_product(pid), pid  # every acknowledged write is there after the restart
        assert not any(store.has_product(pid) for pid in deleted_at)
        assert store.check()["ok"], store.check()["problems"]


def _poll(fn, timeout_s: float = 20.0):
    """fn() until it returns something true, at most ``timeout_s`` (the server follows the index
    every REFRESH_INTERVAL_S in the background); returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_locked_server_follows_the_indexer_and_becomes_writable_when_it_is_done(index_copy, tiny_model):
    """A server with keys started while 'lookalike index' runs: it serves the indexer's commits
    without a restart (followed in the background, not rebuilt inside a search), and its 409
    'retry' works once the indexer lets go of the lock."""
    from indexer.store import Product
    from indexer.updates import PhotoUpload, upsert_product

    photo, later = _photo((250, 10, 130), shape=2), _photo((10, 250, 30), shape=1)
    indexer = Store.open(index_copy, writable=True)
    try:
        with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
            assert _add(c, "R2", [later]).status_code == 409
            upsert_product(indexer, tiny_model, Product("FROM-INDEXER", "t", None, {}), [PhotoUpload(photo)])

            def top_hit(data):
                r = c.post("/v1/search/image?k=1", files={"image": ("q.jpg", data, "image/jpeg")})
                assert r.status_code == 200, r.text
                return r.json()["results"][0]

            assert _poll(lambda: top_hit(photo)["id"] == "FROM-INDEXER")
            indexer.close()
            r = _poll(lambda: (lambda r: r if r.status_code == 201 else None)(_add(c, "R2", [later])))
            assert r is not None and r.status_code == 201
            assert top_hit(later)["id"] == "R2" and top_hit(later)["score"] == 1.0
            assert c.get("/readyz").json()["products"] == Store.open(index_copy).count_products()
    finally:
        indexer.close()
    with Store.open(index_copy) as store:
        assert store.check()["ok"]


def test_closed_set_labels_follow_the_catalogue_as_it_grows_and_shrinks(index_copy, tiny_model, monkeypatch):
    """POST /v1/labels?closed_set=true needs 100 distinct catalogue photos: with fewer it answers
    closed_set false; products added through the API count as soon as the catalogue has changed
    (the refresh interval is set to 0 here; 10 s by default), and deleting them turns it off again."""
    import server.engine

    monkeypatch.setattr(server.engine, "LABEL_REFERENCE_REFRESH_S", 0.0)
    with Store.open(index_copy) as store:
        have = store.count_photos()
    missing = max(0, 100 - have)
    query = {"image": ("q.jpg", _photo((120, 60, 200)), "image/jpeg")}

    def closed(c) -> bool:
        r = c.post("/v1/labels?closed_set=true", files=query, data={"labels": ["hoodie", "bag", "shoe"]})
        assert r.status_code == 200, r.text
        return r.json()["closed_set"]

    with TestClient(create_app(index_copy, model=tiny_model, api_keys=KEY)) as c:
        assert not closed(c)
        added = [f"G{i}" for i in range(missing + 5)]
        for i, pid in enumerate(added):  # distinct photos: repeats of one vector do not count
            colour = (30 + (i * 37) % 200, 40 + (i * 71) % 200, 50 + (i * 113) % 200)
            assert _add(c, pid, [_photo(colour, shape=i % 4)], title=f"g{i}").status_code == 201
        assert closed(c)
        for pid in added:
            assert c.delete(f"/v1/products/{pid}", headers=AUTH).status_code in (200, 204)
        assert not closed(c)


def test_a_slow_catalogue_read_after_an_add_does_not_stop_the_event_loop(index_copy, tiny_model):
    """POST /v1/products is an async route: the SQLite counts it refreshes the gauges with used to run on
    the event loop itself, so a slow disk stalled every connection, /healthz included."""
    app = create_app(index_copy, model=tiny_model, api_keys=KEY)
    with LiveServer(app) as live:
        store = app.state.engine.store
        real_count = store.count_products
        in_count = threading.Event()

        def slow_count():  # a disk that takes 3 s to answer
            in_count.set()
            time.sleep(3)
            return real_count()

        store.count_products = slow_count
        try:
            with httpx.Client(base_url=live.url, timeout=30) as c:
                adding = threading.Thread(target=lambda: _add(c, "SLOW-1", [_photo((10, 120, 30))], title="t"))
                adding.start()
                assert in_count.wait(30)
                t0 = time.monotonic()
                assert httpx.get(live.url + "/healthz", timeout=30).status_code == 200
                healthz_s = time.monotonic() - t0
                adding.join(30)
        finally:
            store.count_products = real_count
        assert healthz_s < 1.5, healthz_s  # the count still sleeps meanwhile: it runs off the event loop
        assert httpx.get(live.url + "/v1/products/SLOW-1", timeout=30).status_code == 200


def test_an_update_stalled_after_its_commit_holds_its_slot_and_the_next_waits_write_timeout_s(index_copy, tiny_model):
    """A COMMIT whose fsync stalls holds its write slot and the write lock past any deadline (the deadline
    bounds the waits before writing, not the disk). With one slot, the next update waits for it on the event
    loop for ``write_timeout_s``, then gets 503 ``index_busy`` naming the slots, having written nothing;
    the stalled one lands once the disk answers."""
    app = create_app(index_copy, model=tiny_model, api_keys=KEY, write_timeout_s=1.0, max_concurrent_writes=1)
    with LiveServer(app) as live:
        store = app.state.engine.store
        stalled, disk_back = threading.Event(), threading.Event()

        def stalled_disk():  # between SQLite's COMMIT and the FAISS update, under the write lock
            stalled.set()
            disk_back.wait(30)

        store.after_commit_hook = stalled_disk
        pid = store.product_ids()[0]
        try:
            with httpx.Client(base_url=live.url, timeout=30) as c:
                first: list[httpx.Response] = []
                t = threading.Thread(target=lambda: first.append(
                    c.patch(f"/v1/products/{pid}", json={"title": "stalled"}, headers=AUTH)))
                t.start()
                assert stalled.wait(30)
                store.after_commit_hook = None
                t0 = time.monotonic()
                r = httpx.patch(f"{live.url}/v1/products/{pid}", json={"title": "second"}, headers=AUTH, timeout=30)
                took = time.monotonic() - t0
                assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
                assert r.json()["error"]["code"] == "index_busy" and "write slots" in r.json()["error"]["message"]
                assert 0.9 < took < 5, took
                assert httpx.get(live.url + "/healthz", timeout=5).status_code == 200
                disk_back.set()
                t.join(30)
            assert first[0].status_code == 200 and first[0].json()["title"] == "stalled"
            assert httpx.get(f"{live.url}/v1/products/{pid}", timeout=30).json()["title"] == "stalled"
        finally:
            disk_back.set()
            store.after_commit_hook = None


def test_write_slots_work_on_a_second_event_loop(index_copy, tiny_model):
    """The write slots are per event loop: an app served by one loop and then another (two TestClient
    sessions, as tests and apps embedded in other servers do) still bounds and queues its updates
    (a single asyncio.Semaphore made in create_app raised 'bound to a different event loop', a 500)."""
    app = create_app(index_copy, model=tiny_model, api_keys=KEY, max_concurrent_writes=1, write_timeout_s=20)
    for title in ("first loop", "second loop"):
        with TestClient(app) as c:
            assert _queue_behind_a_stalled_update(c, app.state.engine.store, title) == [200, 200]
            assert c.get(f"/v1/products/{app.state.engine.store.product_ids()[0]}").json()["title"] == title


def _queue_behind_a_stalled_update(c: TestClient, store: Store, title: str) -> list[int]:
    """Stall one update after its commit, send a second that must wait for the one write slot, then let the
    disk answer; the two status codes, in the order they came."""
    pid = store.product_ids()[0]
    stalled, disk_back = threading.Event(), threading.Event()
    answers: list[int] = []

    def stall():
        stalled.set()
        disk_back.wait(30)

    def patch(value: str):
        answers.append(c.patch(f"/v1/products/{pid}", json={"title": value}, headers=AUTH).status_code)

    store.after_commit_hook = stall
    first = threading.Thread(target=patch, args=("stalled",))
    first.start()
    assert stalled.wait(30)
    store.after_commit_hook = None
    second = threading.Thread(target=patch, args=(title,))
    second.start()  # waits for the one slot, on this session's loop
    time.sleep(0.5)
    assert answers == []
    disk_back.set()
    first.join(30)
    second.join(30)
    return answers
