"""Tests for indexer.store: the FAISS + SQLite index directory.

Vectors are seeded random unit vectors of the test-tiny model's dimension; every
search result is compared with a brute-force numpy computation over the same
photos (a product scores by its best photo).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import ann
from indexer.errors import NotFound
from indexer.model import load_model
from indexer.store import (
    MIN_RECONSTRUCTION_COSINE, ModelMismatch, PhotoRecord, Product, Store, StoreError, check_model, read_manifest,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def identity():
    return load_model("test-tiny", None, "cpu").identity


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Catalogue:
    """A random catalogue kept beside the store, to compute expected results by brute force."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim = dim
        self.rng = np.random.default_rng(seed)
        self.products: dict[str, Product] = {}
        self.photos: dict[tuple[str, str], np.ndarray] = {}

    def make(self, pid: str, n_photos: int, category: str | None = None, vectors=None) -> tuple[Product, list[PhotoRecord]]:
        product = Product(pid, f"title {pid}", category, {"n": n_photos})
        vecs = unit(self.rng, n_photos, self.dim) if vectors is None else np.asarray(vectors, np.float32)
        records = []
        for i, v in enumerate(vecs):
            src = f"/photos/{pid}/{i}.jpg"
            records.append(PhotoRecord(pid, src, f"{hash((pid, i)) & 0xFFFFFFFF:064x}", v, metadata={"view": i}))
            self.photos[(pid, src)] = v
        self.products[pid] = product
        return product, records

    def add_to(self, store: Store, specs: list[tuple]) -> None:
        with store.transaction() as tx:
            for spec in specs:
                product, records = self.make(*spec)
                tx.upsert_products([product])
                tx.add_photos(records)

    def delete(self, pid: str) -> None:
        del self.products[pid]
        for key in [k for k in self.photos if k[0] == pid]:
            del self.photos[key]

    def expected(self, q: np.ndarray, k: int, category=None, min_score=None, exclude=()) -> list[tuple[str, float, str]]:
        best: dict[str, tuple[float, str]] = {}
        for (pid, src), v in self.photos.items():
            s = float(np.dot(q, v))
            if pid not in best or s > best[pid][0]:
                best[pid] = (s, src)
        out = []
        for pid, (s, src) in best.items():
            cat = self.products[pid].category
            if pid in exclude or (min_score is not None and s < min_score):
                continue
            if category is not None:
                want = category.strip("/").casefold()
                if not cat or not (cat.casefold() == want or cat.casefold().startswith(want + "/")):
                    continue
            out.append((pid, s, src))
        out.sort(key=lambda t: (-t[1], t[0]))
        return out[:k]


def assert_hits(hits, expected):
    assert [h.product_id for h in hits] == [e[0] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=1e-5)
    assert [h.source for h in hits] == [e[2] for e in expected]


@pytest.fixture
def store(tmp_path: Path, identity):
    s = Store.create(tmp_path / "idx", identity)
    yield s
    s.close()


@pytest.fixture
def filled(store: Store, identity):
    """30 products of 1-3 photos in a few categories."""
    cat = Catalogue(identity.dim, seed=1)
    cats = ["Men/Tops/Tees", "men/bottoms", "Menswear", "Women/Tops", None]
    cat.add_to(store, [(f"p{i:02d}", 1 + i % 3, cats[i % len(cats)]) for i in range(30)])
    return store, cat


def snapshot_path(store: Store) -> Path:
    return store.path / f"vectors.g{store.generation()}.faiss"


def search_all(store: Store, queries: np.ndarray, **kw):
    return [[(h.product_id, round(h.score, 5), h.photo_id, h.source) for h in hits] for hits in store.search(queries, **kw)]


# --------------------------------------------------------------------------- create / open


def test_create_writes_layout_and_identity(tmp_path: Path, identity):
    path = tmp_path / "new" / "idx"
    with Store.create(path, identity) as s:
        assert s.writable and s.identity == identity
        assert s.generation() == 0
        assert (path / "catalogue.sqlite").is_file()
        assert (path / "vectors.g0.faiss").is_file()
        assert s.search(unit(np.random.default_rng(0), 1, identity.dim), k=5) == [[]]
        assert s.check()["ok"]
    manifest = read_manifest(path)
    assert manifest["model"] == identity.to_dict()
    assert manifest["products"] == 0 and manifest["photos"] == 0
    with Store.open(path) as r:
        assert not r.writable
        assert r.identity == identity
        check_model(r, identity)
        with pytest.raises(StoreError, match="read-only"):
            with r.transaction():
                pass


def test_create_on_existing_index_with_same_model_keeps_data(tmp_path: Path, identity):
    cat = Catalogue(identity.dim)
    with Store.create(tmp_path / "idx", identity) as s:
        cat.add_to(s, [("a", 2)])
        s.save()
    with Store.create(tmp_path / "idx", identity) as s:
        assert s.product_ids() == ["a"] and s.count_photos() == 2


def test_create_with_another_model_raises_model_mismatch(tmp_path: Path, identity):
    with Store.create(tmp_path / "idx", identity) as s:
        Catalogue(identity.dim).add_to(s, [("a", 1)])
        s.save()
    other = dataclasses.replace(identity, weights_sha256="0" * 64)
    with pytest.raises(ModelMismatch) as e:
        Store.create(tmp_path / "idx", other)
    assert "test-tiny" in str(e.value) and "new directory" in str(e.value)
    with Store.open(tmp_path / "idx") as r:
        with pytest.raises(ModelMismatch):
            check_model(r, other)
    # the failed create released the writer lock and changed nothing
    with Store.open(tmp_path / "idx", writable=True) as s:
        assert s.identity == identity and s.product_ids() == ["a"]


def test_open_non_index_is_store_error(tmp_path: Path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    for p in (tmp_path / "junk", tmp_path / "missing"):
        with pytest.raises(StoreError, match="not a lookalike index"):
            Store.open(p)
        with pytest.raises(StoreError):
            read_manifest(p)


@pytest.mark.parametrize("name", ["shop #1", "50% off", "what?"])
def test_index_directory_name_with_uri_characters(tmp_path: Path, identity, name: str):
    """The SQLite database must live inside the index directory whatever its name."""
    path = tmp_path / name
    cat = Catalogue(identity.dim)
    with Store.create(path, identity) as s:
        cat.add_to(s, [("a", 1)])
        s.save()
    assert (path / "catalogue.sqlite").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with Store.open(path) as r:
        assert r.product_ids() == ["a"]
        assert r.check()["ok"]


# --------------------------------------------------------------------------- locking


def test_second_writer_gets_store_error(store: Store, identity):
    with pytest.raises(StoreError, match="another process"):
        Store.open(store.path, writable=True)
    with pytest.raises(StoreError, match="another process"):
        Store.create(store.path, identity)
    # readers need no lock
    with Store.open(store.path) as r:
        assert r.count_products() == 0
    store.close()
    with Store.open(store.path, writable=True) as again:
        assert again.writable


# --------------------------------------------------------------------------- search


def test_search_matches_brute_force(filled):
    store, cat = filled
    queries = unit(np.random.default_rng(7), 6, cat.dim)
    for k in (1, 5, 30):
        for q, hits in zip(queries, store.search(queries, k=k)):
            assert_hits(hits, cat.expected(q, k))


def test_product_ranks_by_best_photo_and_appears_once(store: Store, identity):
    cat = Catalogue(identity.dim, seed=3)
    rng = np.random.default_rng(3)
    q = unit(rng, 1, identity.dim)[0]
    noise = unit(rng, 3, identity.dim)
    near = q + 0.3 * noise[0]
    far = -q + 0.1 * noise[1]
    mid = q + 1.0 * noise[2]
    cat.add_to(store, [("two", 2, None, [far / np.linalg.norm(far), near / np.linalg.norm(near)]),
                       ("one", 1, None, [mid / np.linalg.norm(mid)])])
    hits = store.search(q[None, :], k=10)[0]
    assert [h.product_id for h in hits] == ["two", "one"]
    assert hits[0].source == "/photos/two/1.jpg"  # the matched photo, not the first one
    assert hits[0].score == pytest.approx(float(np.dot(q, near / np.linalg.norm(near))), abs=1e-5)
    assert hits[0].photo_metadata == {"view": 1}
    assert hits[0].metadata == {"n": 2} and hits[0].title == "title two"
    d = hits[0].to_dict()
    assert d["id"] == "two" and d["image"] == "/photos/two/1.jpg"


def test_k_larger_than_catalogue_returns_every_product_once(filled):
    store, cat = filled
    q = unit(np.random.default_rng(11), 1, cat.dim)
    hits = store.search(q, k=1000)[0]
    assert sorted(h.product_id for h in hits) == sorted(cat.products)
    assert_hits(hits, cat.expected(q[0], 1000))
    assert store.search(q, k=0) == [[]]


def test_category_filter_prefix_case_insensitive(filled):
    store, cat = filled
    q = unit(np.random.default_rng(12), 1, cat.dim)
    hits = store.search(q, k=100, category="Men")[0]
    assert {h.category for h in hits} == {"Men/Tops/Tees", "men/bottoms"}  # not "Menswear"
    assert_hits(hits, cat.expected(q[0], 100, category="Men"))
    assert {h.category for h in store.search(q, k=100, category="MEN/tops/")[0]} == {"Men/Tops/Tees"}
    assert store.search(q, k=100, category="Men/Tops/Tees/XL")[0] == []
    assert store.search(q, k=100, category="Kids")[0] == []


def test_rare_category_is_found_beyond_the_first_fetch(store: Store, identity):
    cat = Catalogue(identity.dim, seed=5)
    rng = np.random.default_rng(5)
    q = unit(rng, 1, identity.dim)[0]
    common = [(f"w{i:03d}", 1, "Women/Tops") for i in range(300)]
    # the rare products sit at the very bottom of the ranking for q
    rare_vecs = [-q, -(q + 0.05 * unit(rng, 1, identity.dim)[0])]
    rare = [("rare0", 1, "Gear/Watches", [rare_vecs[0]]),
            ("rare1", 1, "Gear/Bags", [rare_vecs[1] / np.linalg.norm(rare_vecs[1])])]
    cat.add_to(store, common + rare)
    hits = store.search(q[None, :], k=3, category="gear")[0]
    assert [h.product_id for h in hits] == ["rare1", "rare0"]
    assert_hits(hits, cat.expected(q, 3, category="gear"))
    assert hits[-1].score == pytest.approx(-1.0, abs=1e-5)


def test_min_score(filled):
    store, cat = filled
    q = unit(np.random.default_rng(13), 1, cat.dim)
    expected_all = cat.expected(q[0], 1000)
    threshold = (expected_all[7][1] + expected_all[8][1]) / 2  # exactly 8 products reach it
    hits = store.search(q, k=1000, min_score=threshold)[0]
    assert len(hits) == 8 and all(h.score >= threshold for h in hits)
    assert_hits(hits, cat.expected(q[0], 1000, min_score=threshold))
    assert store.search(q, k=1000, min_score=1.01)[0] == []
    assert len(store.search(q, k=1000, min_score=-1.01)[0]) == 30
    assert_hits(store.search(q, k=3, min_score=threshold)[0], expected_all[:3])


def test_exclude(filled):
    store, cat = filled
    q = unit(np.random.default_rng(14), 1, cat.dim)
    top = [e[0] for e in cat.expected(q[0], 5)]
    hits = store.search(q, k=5, exclude=top[:3])[0]
    assert not {h.product_id for h in hits} & set(top[:3])
    assert_hits(hits, cat.expected(q[0], 5, exclude=set(top[:3])))
    everything = store.search(q, k=100, exclude=list(cat.products))[0]
    assert everything == []


def test_search_rejects_bad_query_shape(filled):
    store, cat = filled
    with pytest.raises(StoreError, match="shape"):
        store.search(np.ones(cat.dim, np.float32), k=3)
    with pytest.raises(StoreError, match="shape"):
        store.search(np.ones((1, cat.dim + 1), np.float32), k=3)


def test_ties_broken_by_product_id(store: Store, identity):
    v = unit(np.random.default_rng(15), 1, identity.dim)
    Catalogue(identity.dim).add_to(store, [("b", 1, None, v), ("a", 1, None, v), ("c", 1, None, v)])
    assert [h.product_id for h in store.search(v, k=3)[0]] == ["a", "b", "c"]


def test_similar_excludes_the_product_itself(filled):
    store, cat = filled
    pid = "p02"  # 3 photos
    vecs = store.product_vectors(pid)
    assert vecs.shape == (3, cat.dim)
    hits = store.similar(pid, k=5)
    assert pid not in {h.product_id for h in hits}
    assert len(hits) == 5
    # each other product scores by its best match to any of pid's photos
    best: dict[str, float] = {}
    for q in vecs:
        for other, s, _ in cat.expected(q, 1000, exclude={pid}):
            best[other] = max(best.get(other, -2.0), s)
    expected = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:5]
    assert [h.product_id for h in hits] == [e[0] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=1e-5)
    men = store.similar(pid, k=100, category="Men")
    assert men and all(h.category.casefold().startswith("men/") for h in men)
    with pytest.raises(NotFound):
        store.similar("nope")


def test_get_product(filled):
    store, cat = filled
    p = store.get_product("p01")
    assert p["id"] == "p01" and p["title"] == "title p01" and p["category"] == "men/bottoms"
    assert p["metadata"] == {"n": 2}
    assert [im["image"] for im in p["images"]] == ["/photos/p01/0.jpg", "/photos/p01/1.jpg"]
    assert [im["metadata"] for im in p["images"]] == [{"view": 0}, {"view": 1}]
    np.testing.assert_allclose(store.product_vectors("p01"),
                               np.stack([cat.photos[("p01", f"/photos/p01/{i}.jpg")] for i in range(2)]))
    with pytest.raises(NotFound, match="nope"):
        store.get_product("nope")
    with pytest.raises(NotFound):
        store.product_vectors("nope")
    assert dict(store.categories())["Men/Tops/Tees"] == 6


# --------------------------------------------------------------------------- writing


def test_delete_products_removes_photos_from_faiss(filled):
    store, cat = filled
    victim = "p05"
    victim_vecs = store.product_vectors(victim)
    photos_before = store.count_photos()
    with store.transaction() as tx:
        assert tx.delete_products([victim, "never-existed"]) == 1
    cat.delete(victim)
    assert store.count_photos() == photos_before - len(victim_vecs)
    assert victim not in store.product_ids()
    for hits in store.search(victim_vecs, k=1000):
        assert victim not in {h.product_id for h in hits}
        assert len(hits) == 29
    # querying with its own photo: the best remaining hit is far from 1.0
    assert store.search(victim_vecs[:1], k=1)[0][0].score < 0.9
    store.save()
    assert store.check()["ok"], store.check()["problems"]
    with Store.open(store.path) as r:
        for q, hits in zip(victim_vecs, r.search(victim_vecs, k=1000)):
            assert_hits(hits, cat.expected(q, 1000))


def test_replacing_a_photo_gives_a_new_id_and_no_duplicate(filled):
    store, cat = filled
    old = store.get_product("p00")["images"][0]
    old_vec = store.product_vectors("p00")[0]
    new_vec = unit(np.random.default_rng(99), 1, cat.dim)[0]
    n_photos = store.count_photos()
    with store.transaction() as tx:
        tx.add_photos([PhotoRecord("p00", old["image"], "f" * 64, new_vec, metadata={"view": "new"})])
    cat.photos[("p00", old["image"])] = new_vec
    images = store.get_product("p00")["images"]
    assert len(images) == 1
    assert images[0]["photo_id"] > old["photo_id"] and images[0]["metadata"] == {"view": "new"}
    assert store.count_photos() == n_photos
    hits = store.search(new_vec[None, :], k=1000)[0]
    assert [h.product_id for h in hits].count("p00") == 1
    assert hits[0].product_id == "p00" and hits[0].photo_id == images[0]["photo_id"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    old_hits = store.search(old_vec[None, :], k=1000)[0]
    assert_hits(old_hits, cat.expected(old_vec, 1000))
    store.save()
    assert store.check()["ok"], store.check()["problems"]


def test_same_photo_twice_in_one_transaction(store: Store, identity):
    v = unit(np.random.default_rng(1), 2, identity.dim)
    with store.transaction() as tx:
        tx.upsert_products([Product("a")])
        tx.add_photos([PhotoRecord("a", "/x.jpg", "0" * 64, v[0])])
        tx.add_photos([PhotoRecord("a", "/x.jpg", "1" * 64, v[1])])
    assert store.count_photos() == 1
    hits = store.search(v, k=5)
    assert hits[0][0].score == pytest.approx(float(v[0] @ v[1]), abs=1e-5)
    assert hits[1][0].score == pytest.approx(1.0, abs=1e-5)
    store.save()
    assert store.check()["ok"], store.check()["problems"]


def test_photo_ids_are_never_reused(store: Store, identity):
    cat = Catalogue(identity.dim)
    cat.add_to(store, [("a", 2), ("b", 2)])
    ids_b = [im["photo_id"] for im in store.get_product("b")["images"]]
    with store.transaction() as tx:
        tx.delete_products(["b"])
    with store.transaction() as tx:
        tx.delete_photos([ids_b[0]])  # already gone: no-op
    store.save()
    store.close()
    with Store.open(store.path, writable=True) as s:
        cat.add_to(s, [("c", 1)])
        new_id = s.get_product("c")["images"][0]["photo_id"]
        assert new_id > max(ids_b)


def test_delete_photos_and_upsert_changes(store: Store, identity):
    cat = Catalogue(identity.dim)
    cat.add_to(store, [("a", 3, "Men")])
    g = store.generation()
    with store.transaction() as tx:  # same values: nothing changes
        tx.upsert_products([cat.products["a"]])
    assert store.generation() == g
    with store.transaction() as tx:
        tx.upsert_products([Product("a", "new title", "Women", {"n": 3})])
    assert store.generation() == g + 1
    assert store.get_product("a")["category"] == "Women"
    ids = [im["photo_id"] for im in store.get_product("a")["images"]]
    with store.transaction() as tx:
        tx.delete_photos(ids[:2])
    assert store.count_photos() == 1
    hits = store.search(store.product_vectors("a"), k=10)[0]
    assert [h.photo_id for h in hits] == [ids[2]]
    store.save()
    assert store.check()["ok"], store.check()["problems"]


def test_wrong_vector_size_rolls_back_the_whole_transaction(store: Store, identity):
    cat = Catalogue(identity.dim)
    cat.add_to(store, [("a", 1)])
    with pytest.raises(StoreError, match="expects"):
        with store.transaction() as tx:
            tx.upsert_products([Product("b")])
            tx.add_photos([PhotoRecord("b", "/b.jpg", "0" * 64, np.ones(identity.dim, np.float32) / 8)])
            tx.add_photos([PhotoRecord("b", "/c.jpg", "0" * 64, np.ones(identity.dim + 1, np.float32))])
    assert store.product_ids() == ["a"] and store.count_photos() == 1


# --------------------------------------------------------------------------- atomicity


def test_exception_in_transaction_rolls_back_sqlite_and_faiss(filled):
    store, cat = filled
    queries = unit(np.random.default_rng(21), 4, cat.dim)
    before = search_all(store, queries, k=1000)
    gen, n_products, n_photos = store.generation(), store.count_products(), store.count_photos()
    ntotal = store.vectors.state().ntotal
    extra = unit(np.random.default_rng(22), 2, cat.dim)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.transaction() as tx:
            tx.delete_products(["p00", "p01"])
            tx.upsert_products([Product("new")])
            tx.add_photos([PhotoRecord("new", "/n.jpg", "0" * 64, extra[0]),
                           PhotoRecord("p02", "/photos/p02/0.jpg", "0" * 64, extra[1])])
            raise Boom
    assert store.generation() == gen
    assert store.count_products() == n_products and store.count_photos() == n_photos
    assert "new" not in store.product_ids()
    assert store.vectors.state().ntotal == ntotal
    assert search_all(store, queries, k=1000) == before
    for q, hits in zip(extra, store.search(extra, k=1000)):  # the rolled-back photos are not in FAISS
        assert_hits(hits, cat.expected(q, 1000))
    # the connection is usable afterwards
    with store.transaction() as tx:
        tx.delete_products(["p03"])
    assert store.generation() == gen + 1
    store.save()
    assert store.check()["ok"], store.check()["problems"]


def test_reopen_reads_the_snapshot(filled, monkeypatch):
    store, cat = filled
    store.save()
    queries = unit(np.random.default_rng(31), 5, cat.dim)
    before = search_all(store, queries, k=10)
    store.close()

    def no_rebuild(self):
        raise AssertionError("rebuilt from SQLite although a valid snapshot exists")

    monkeypatch.setattr(Store, "_rebuild_index", no_rebuild)
    with Store.open(store.path) as r:
        assert search_all(r, queries, k=10) == before
    with Store.open(store.path, writable=True) as w:
        assert search_all(w, queries, k=10) == before
        assert w.check()["ok"]


def test_missing_snapshot_is_rebuilt_from_sqlite(filled):
    store, cat = filled
    store.save()
    queries = unit(np.random.default_rng(32), 5, cat.dim)
    before = search_all(store, queries, k=10)
    store.close()
    snaps = list(store.path.glob("vectors.g*.faiss"))
    assert len(snaps) == 1
    snaps[0].unlink()
    with Store.open(store.path) as r:  # a reader rebuilds in memory
        assert search_all(r, queries, k=10) == before
        result = r.check()  # SQLite is the truth: a missing snapshot is a note, rebuilt on the next open
        assert result["ok"] and any("rebuilt from SQLite" in n for n in result["notes"]), result
        assert not snaps[0].exists()
    with Store.open(store.path, writable=True) as w:  # a writer also writes the snapshot back
        assert search_all(w, queries, k=10) == before
        assert snaps[0].is_file()
        assert w.check()["ok"], w.check()["problems"]


def test_crash_between_commit_and_snapshot(filled):
    store, cat = filled
    store.save()
    old_gen = store.generation()
    cat.add_to(store, [("late", 2, "Men/Late")])
    with store.transaction() as tx:
        tx.delete_products(["p04"])
    cat.delete("p04")
    # no save(): the process dies here, leaving the snapshot of the old generation
    store.close()
    assert store.generation() == old_gen + 2
    assert [p.name for p in store.path.glob("vectors.g*.faiss")] == [f"vectors.g{old_gen}.faiss"]
    queries = np.concatenate([store.product_vectors("late"), unit(np.random.default_rng(33), 3, cat.dim)])
    with Store.open(store.path) as r:
        assert r.count_products() == 30
        for q, hits in zip(queries, r.search(queries, k=1000)):
            assert_hits(hits, cat.expected(q, 1000))
        assert r.search(queries[:1], k=1)[0][0].product_id == "late"
    with Store.open(store.path, writable=True) as w:
        for q, hits in zip(queries, w.search(queries, k=1000)):
            assert_hits(hits, cat.expected(q, 1000))
        report = w.check()
        assert report["ok"], report["problems"]
        assert report["generation"] == old_gen + 2
        assert read_manifest(w.path)["products"] == 30


def test_refresh_sees_another_writers_commit(filled):
    store, cat = filled
    store.save()
    with Store.open(store.path) as reader:
        cat.add_to(store, [("fresh", 1)])
        v = store.product_vectors("fresh")
        assert "fresh" not in {h.product_id for h in reader.search(v, k=1)[0]}
        assert reader.refresh() is True
        assert reader.search(v, k=1)[0][0].product_id == "fresh"
        assert reader.refresh() is False


# --------------------------------------------------------------------------- check


def _write_snapshot(store: Store, ids: list[int], vecs: np.ndarray) -> None:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(store.identity.dim))
    index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.array(ids, np.int64))
    faiss.write_index(index, str(snapshot_path(store)))


def _sql_photos(store: Store) -> tuple[list[int], np.ndarray]:
    rows = store._db().execute("SELECT photo_id, vector FROM photos ORDER BY photo_id").fetchall()
    return [r[0] for r in rows], np.stack([np.frombuffer(r[1], np.float32) for r in rows])


def test_check_ok(filled):
    store, cat = filled
    store.save()
    report = store.check()
    assert report["ok"] and report["problems"] == []
    assert report["products"] == 30 and report["photos"] == sum(1 + i % 3 for i in range(30))
    assert report["generation"] == store.generation()


def test_check_reports_extra_id_in_snapshot(filled):
    store, _ = filled
    store.save()
    ids, vecs = _sql_photos(store)
    _write_snapshot(store, ids + [max(ids) + 100], np.vstack([vecs, vecs[:1]]))
    report = store.check()
    assert not report["ok"]
    assert any("no photo row" in p for p in report["problems"]), report["problems"]


def test_check_reports_duplicate_and_missing_ids(filled):
    store, _ = filled
    store.save()
    ids, vecs = _sql_photos(store)
    _write_snapshot(store, ids[:-1] + [ids[0]], vecs)
    problems = store.check()["problems"]
    assert any("1 duplicate" in p for p in problems), problems
    assert any("have no FAISS vector" in p for p in problems), problems


def test_check_reports_vectors_that_differ(filled):
    store, _ = filled
    store.save()
    ids, vecs = _sql_photos(store)
    vecs = vecs.copy()
    vecs[3] = -vecs[3]
    _write_snapshot(store, ids, vecs)
    problems = store.check()["problems"]
    assert problems == ["1 FAISS vectors differ from the stored embeddings"]


def test_check_reports_edited_manifest_counts(filled):
    store, _ = filled
    store.save()
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["photos"] += 1
    path.write_text(json.dumps(manifest))
    problems = store.check()["problems"]
    assert len(problems) == 1 and "manifest counts" in problems[0]
    path.write_text("{not json")
    assert any("manifest unreadable" in p for p in store.check()["problems"])


def test_check_reports_unreadable_snapshot(filled):
    """check() is the diagnostic tool: a corrupt snapshot is a problem to report, not a crash."""
    store, _ = filled
    store.save()
    snapshot_path(store).write_bytes(b"\0garbage" * 100)
    report = store.check()
    assert not report["ok"] and report["problems"]


def test_writable_open_repairs_a_bad_snapshot(filled):
    """A snapshot that disagrees with SQLite is rebuilt on open; a writer must also replace it on
    disk, otherwise every later open rebuilds again and check() keeps failing."""
    store, cat = filled
    store.save()
    queries = unit(np.random.default_rng(41), 3, cat.dim)
    before = search_all(store, queries, k=10)
    ids, vecs = _sql_photos(store)
    _write_snapshot(store, ids[:-1], vecs[:-1])  # one photo lost
    store.close()
    with Store.open(store.path, writable=True) as w:
        assert search_all(w, queries, k=10) == before  # rebuilt from SQLite
        w.save()
        assert w.check()["ok"], w.check()["problems"]


def test_open_ignores_a_snapshot_that_disagrees_with_sqlite(filled):
    store, cat = filled
    store.save()
    queries = unit(np.random.default_rng(42), 4, cat.dim)
    before = search_all(store, queries, k=1000)
    ids, vecs = _sql_photos(store)
    _write_snapshot(store, ids[:-1], vecs[:-1])  # the last photo lost
    store.close()
    with Store.open(store.path) as r:
        assert search_all(r, queries, k=1000) == before


# --------------------------------------------------------------------------- approximate indexes


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors from the clustered generator of scripts/bench_search.py (ANN recall on uniform
    random vectors says nothing about real embeddings)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[1] / "scripts" / "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.embedding_like(n, dim, clusters=100, sample_seed=seed)


APPROX_PRODUCTS = ann.IVFPQ_MIN_VECTORS + 16  # enough to train IVF-PQ


@pytest.fixture(scope="module", params=["hnsw", "ivfpq"])
def approx_built(request, tmp_path_factory, identity):
    """A saved store of ~10,000 one-photo products with a forced HNSW or IVF-PQ index (built once)."""
    path = tmp_path_factory.mktemp(request.param) / "idx"
    cat = Catalogue(identity.dim, seed=5)
    vecs = clustered(APPROX_PRODUCTS, identity.dim, seed=1)
    cats = ["Men/Tops", "Women/Tops", "Gear", None]
    with Store.create(path, identity) as store:
        store.set_index_choice(request.param)
        cat.add_to(store, [(f"p{i:05d}", 1, cats[i % 4], vecs[i : i + 1]) for i in range(APPROX_PRODUCTS)])
        store.save()
    return request.param, path, cat


@pytest.fixture
def approx(approx_built, tmp_path):
    """A writable copy of the approximate store and its catalogue (tests may change both)."""
    import copy
    import shutil

    kind, path, cat = approx_built
    shutil.copytree(path, tmp_path / "idx")
    with Store.open(tmp_path / "idx", writable=True) as store:
        yield kind, store, copy.deepcopy(cat)


def product_recall(store: Store, cat: Catalogue, queries: np.ndarray, k: int = 10, **knobs) -> float:
    found = store.search(queries, k, **knobs)
    return float(np.mean([
        len({h.product_id for h in hits} & {e[0] for e in cat.expected(q, k)}) / k for q, hits in zip(queries, found)
    ]))


def test_forced_approximate_index_is_recorded_in_meta_and_manifest(approx):
    kind, store, _ = approx
    expected = {"hnsw": ann.HNSW, "ivfpq": ann.IVFPQ}[kind]
    manifest = read_manifest(store.path)
    assert manifest["index"]["type"] == expected == store.index_spec().type
    assert manifest["index"]["params"] == store.index_spec().params
    assert manifest["index"]["choice"] == {"requested": kind, "memory_budget_bytes": ann.DEFAULT_MEMORY_BUDGET}
    assert ann.describe(faiss.read_index(str(snapshot_path(store)))).type == expected
    report = store.check()
    assert report["ok"] and [n for n in report["notes"] if "no longer on disk" not in n] == [], report  # sources are made up


def test_approximate_search_recall_and_exact_scores(approx):
    _, store, cat = approx
    queries = clustered(20, cat.dim, seed=2)
    assert product_recall(store, cat, queries) >= 0.9
    vectors = {src: v for (_, src), v in cat.photos.items()}
    for q, hits in zip(queries, store.search(queries, k=10)):
        assert len(hits) == 10
        np.testing.assert_allclose([h.score for h in hits], [float(np.dot(q, vectors[h.source])) for h in hits], atol=1e-5)
    for hits in store.search(queries, k=5, category="Men"):
        assert len(hits) == 5 and all(h.category == "Men/Tops" for h in hits)


def test_approximate_index_add_delete_reopen(approx, monkeypatch):
    kind, store, cat = approx
    queries = clustered(10, cat.dim, seed=3)
    gone = sorted({h.product_id for hits in store.search(queries, k=3) for h in hits})
    with store.transaction() as tx:
        tx.delete_products(gone)
    for pid in gone:
        cat.delete(pid)
    new = clustered(5, cat.dim, seed=4)
    cat.add_to(store, [(f"new{i}", 1, "Gear", new[i : i + 1]) for i in range(5)])
    after = store.search(queries, k=10)
    assert not {h.product_id for hits in after for h in hits} & set(gone)  # tombstones never surface
    assert all(len(hits) == 10 for hits in after)
    assert [hits[0].product_id for hits in store.search(new, k=1)] == [f"new{i}" for i in range(5)]
    store.save()
    report = store.check()
    assert report["ok"], report["problems"]
    if kind == "hnsw":
        assert any(f"{len(gone)} deleted photos remain in the HNSW graph" in n for n in report["notes"]), report["notes"]
    before = search_all(store, queries, k=10)
    store.close()

    def no_rebuild(self, spec=None):
        raise AssertionError("rebuilt from SQLite although a valid snapshot exists")

    monkeypatch.setattr(Store, "_rebuild_index", no_rebuild)
    with Store.open(store.path) as reader:
        assert search_all(reader, queries, k=10) == before
        assert reader.check()["ok"]


def test_search_knobs_change_recall_for_one_call_only(approx):
    kind, store, cat = approx
    knob = {"hnsw": "ef_search", "ivfpq": "nprobe"}[kind]
    spec_before = store.index_spec()
    queries = clustered(20, cat.dim, seed=6)
    default = product_recall(store, cat, queries)
    assert product_recall(store, cat, queries, **{knob: 1}) < default - 0.05
    assert product_recall(store, cat, queries, **{knob: 512}) >= default
    assert store.index_spec() == spec_before == store.vectors.spec
    assert read_manifest(store.path)["index"]["params"] == spec_before.params
    with pytest.raises(StoreError, match=f"{knob} must be between 1 and"):
        store.search(queries[:1], 10, **{knob: 0})
    pid = store.search(queries[:1], 1)[0][0].product_id
    assert store.similar(pid, 5, **{knob: 512})


def test_check_compares_approximate_index_vectors_with_sqlite(approx):
    kind, store, _ = approx
    ids, vecs = _sql_photos(store)
    with store.transaction() as tx:  # 7 embeddings change in SQLite behind the index's back
        tx.db.executemany("UPDATE photos SET vector = ? WHERE photo_id = ?", [(-vecs[i], ids[i]) for i in range(7)])
    problems = store.check()["problems"]
    if kind == "hnsw":
        assert problems == ["7 FAISS vectors differ from the stored embeddings"]
    else:
        assert problems == [f"7 IVF-PQ codes do not decode near their stored embeddings (cosine < {MIN_RECONSTRUCTION_COSINE})"]


def test_check_reports_a_snapshot_of_another_type(filled):
    store, _ = filled
    store.set_index_choice("hnsw")
    store.save()
    ids, vecs = _sql_photos(store)
    _write_snapshot(store, ids, vecs)  # a Flat snapshot where the store records HNSW
    problems = store.check()["problems"]
    assert len(problems) == 1 and "is Flat {} index; the store records HNSW {'M': 32}" in problems[0], problems


def test_auto_choice_switches_type_when_the_catalogue_outgrows_exact_search(store: Store, identity, monkeypatch):
    monkeypatch.setattr(ann, "EXACT_UP_TO", 50)
    cat = Catalogue(identity.dim, seed=7)
    cat.add_to(store, [(f"a{i}", 1) for i in range(40)])
    store.save()
    assert store.index_spec().type == ann.FLAT
    gen = store.generation()
    cat.add_to(store, [(f"b{i}", 1) for i in range(20)])
    store.save()
    assert store.index_spec() == ann.hnsw_spec()
    assert store.generation() == gen + 2  # the new photos, then the switch
    assert ann.describe(faiss.read_index(str(snapshot_path(store)))).type == ann.HNSW
    assert read_manifest(store.path)["index"]["type"] == ann.HNSW
    queries = unit(np.random.default_rng(8), 5, cat.dim)
    for q, hits in zip(queries, store.search(queries, k=5)):
        assert_hits(hits, cat.expected(q, 5))  # 60 photos: the graph finds all of them
    assert store.check()["ok"]


def test_hnsw_is_rebuilt_without_tombstones_once_they_pass_the_limit(store: Store, identity):
    store.set_index_choice("hnsw")
    cat = Catalogue(identity.dim, seed=9)
    cat.add_to(store, [(f"p{i}", 1) for i in range(50)])
    store.save()
    with store.transaction() as tx:
        tx.delete_products([f"p{i}" for i in range(5)])  # 10%: kept as tombstones
    store.save()
    assert len(store.vectors.held_ids()) == 50
    with store.transaction() as tx:
        tx.delete_products([f"p{i}" for i in range(5, 15)])  # 30%: rebuilt at the save
    store.save()
    assert sorted(store.vectors.held_ids()) == _sql_photos(store)[0]
    report = store.check()
    assert report["ok"] and [n for n in report["notes"] if "no longer on disk" not in n] == [], report  # sources are made up


def test_index_switch_interrupted_before_its_snapshot_is_rebuilt_on_open(filled):
    store, cat = filled
    store.save()
    store.set_index_choice("hnsw")
    store._maybe_switch_index()  # commits the new type; the process dies before save() writes its snapshot
    store.close()
    queries = unit(np.random.default_rng(10), 3, cat.dim)
    with Store.open(store.path, writable=True) as w:
        assert w.index_spec().type == ann.HNSW and ann.describe(w.vectors.state().index).type == ann.HNSW
        for q, hits in zip(queries, w.search(queries, k=10)):
            assert_hits(hits, cat.expected(q, 10))
        assert w.check()["ok"]


def test_ivfpq_request_on_a_small_catalogue_stays_exact(filled):
    store, _ = filled
    store.set_index_choice("ivfpq", 10**9)
    store.save()
    index = read_manifest(store.path)["index"]
    assert index["type"] == ann.FLAT and index["choice"] == {"requested": "ivfpq", "memory_budget_bytes": 10**9}


def test_set_index_choice_rejects_bad_values(store: Store):
    with pytest.raises(StoreError, match="unknown index type 'annoy'"):
        store.set_index_choice("annoy")
    with pytest.raises(StoreError, match="memory budget must be positive"):
        store.set_index_choice(memory_budget_bytes=0)


def test_cli_rebuild_info_and_bad_flags(filled, capsys):
    from indexer.cli import main

    store, _ = filled
    store.save()
    store.close()
    assert main(["rebuild", str(store.path), "--index-type", "hnsw", "--memory-budget", "2GiB"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    assert main(["info", str(store.path), "--json"]) == 0
    index = json.loads(capsys.readouterr().out)["index"]
    assert index["type"] == "HNSW" and index["params"]["M"] == 32
    assert index["choice"] == {"requested": "hnsw", "memory_budget_bytes": 2 * 2**30}
    assert main(["info", str(store.path)]) == 0
    assert "index: HNSW (M=32, ef_construction=40, ef_search=96)" in capsys.readouterr().out
    assert main(["check", str(store.path)]) == 0
    capsys.readouterr()
    assert main(["search", str(store.path), "--text", "red shoes", "-k", "3", "--ef-search", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    with pytest.raises(SystemExit):
        main(["rebuild", str(store.path), "--memory-budget", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err


def test_check_notes_catalogue_photos_gone_from_disk(store: Store, identity, tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x")
    with store.transaction() as tx:
        tx.upsert_products([Product("a")])
        tx.add_photos([PhotoRecord("a", str(photo), "0" * 64, unit(np.random.default_rng(0), 1, identity.dim)[0])])
    store.save()
    assert not any("no longer on disk" in n for n in store.check()["notes"])
    photo.unlink()
    report = store.check()
    assert report["ok"] and any(n.startswith("1 catalogue photos are no longer on disk") for n in report["notes"])


def test_check_finds_photo_files_named_with_a_tar_separator(store: Store, identity, tmp_path):
    """A photo whose own name holds '::' is a file (only 'shard.tar::member' is a tar member):
    check looks for the file itself, and for the shard of a member."""
    odd = tmp_path / "a::b.jpg"
    odd.write_bytes(b"x")
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"x")
    with store.transaction() as tx:
        tx.upsert_products([Product("a")])
        vecs = unit(np.random.default_rng(1), 2, identity.dim)
        tx.add_photos([PhotoRecord("a", str(odd), "0" * 64, vecs[0]),
                       PhotoRecord("a", f"{shard}::m.jpg", "1" * 64, vecs[1])])
    store.save()
    assert not any("no longer on disk" in n for n in store.check()["notes"])
    odd.unlink()
    shard.unlink()
    assert any(n.startswith("2 catalogue photos are no longer on disk") for n in store.check()["notes"])


def test_a_writable_open_rewrites_a_manifest_a_kill_left_behind(tmp_path: Path, identity):
    """A kill -9 between save()'s snapshot and its manifest leaves the snapshot of the store's
    generation and the manifest of an older one; the next writable open rewrites the manifest
    (a read-only open, as a server follower's, leaves the folder alone)."""
    cat = Catalogue(identity.dim)
    with Store.create(tmp_path / "idx", identity) as s:
        cat.add_to(s, [("a", 2)])
        s.save()
        old = json.loads((s.path / "manifest.json").read_text())
        cat.add_to(s, [("b", 1)])
        s.save()
        gen = s.generation()
    assert old["generation"] < gen and (tmp_path / "idx" / f"vectors.g{gen}.faiss").is_file()
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(old))  # what the kill left
    with Store.open(tmp_path / "idx") as s:
        assert s.count_photos() == 3
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["generation"] == old["generation"]
    with Store.open(tmp_path / "idx", writable=True) as s:
        assert s.count_photos() == 3
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["generation"] == gen


def test_a_slow_disk_shows_in_the_log(tmp_path, identity, monkeypatch, caplog):
    """A file write whose fsync stalls, and a transaction that waits for the write lock, are logged with
    their duration (the server's stalls had no trace in the log)."""
    import threading
    import time

    import indexer.database
    from indexer.store import atomic_write

    monkeypatch.setattr(indexer.database, "SLOW_IO_S", 0.05)
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.1)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    with caplog.at_level("WARNING", logger="lookalike.store"):
        atomic_write(tmp_path / "snapshot.bin", b"abc")
    assert any("writing snapshot.bin (3 bytes, with fsync) took" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(os, "fsync", real_fsync)

    store = Store.create(tmp_path / "index", identity)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lookalike.store"):
        held = threading.Event()

        def hold():
            with store._write_lock:
                held.set()
                time.sleep(0.2)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        with store.transaction() as tx:
            tx.upsert_products([Product("P1")])
        holder.join()
    store.close()
    assert any("waiting for the store's write lock took" in r.getMessage() for r in caplog.records)


def test_a_write_with_a_deadline_raises_index_busy_when_the_write_lock_stays_taken(tmp_path, identity):
    """With a deadline (the server gives each update ``write_timeout_s``), a transaction that cannot take
    the write lock in time raises IndexBusy (503 on the server) before it writes anything; without one,
    it waits. Uploads a transaction releases are deleted after its commit, under its lock (a clean-up
    that took the lock again after the commit could miss a deadline and leave the files for good)."""
    import threading
    import time

    from indexer.records import IndexBusy

    store = Store.create(tmp_path / "index", identity)
    held, release = threading.Event(), threading.Event()

    def hold():
        with store._write_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    t0 = time.perf_counter()
    with pytest.raises(IndexBusy, match="nothing was written"):
        with store.transaction(deadline=time.monotonic() + 0.3) as tx:
            tx.upsert_products([Product("P1")])
    assert 0.25 < time.perf_counter() - t0 < 5
    def no_deadline():
        with store.transaction() as tx:
            tx.upsert_products([Product("P0")])

    waited = threading.Thread(target=no_deadline)
    waited.start()  # no deadline: waits for the lock
    time.sleep(0.3)
    assert waited.is_alive() and store.count_products() == 0
    release.set()
    holder.join()
    waited.join(10)
    assert store.count_products() == 1
    # an upload released in a transaction goes at its commit, under its lock, if nothing refers to it
    kept, released = store.keep_upload(b"kept", "k.jpg"), store.keep_upload(b"released", "r.jpg")
    with store.transaction(deadline=time.monotonic() + 5) as tx:  # the lock is free again
        tx.upsert_products([Product("P2")])
        tx.add_photos([PhotoRecord("P2", kept, "k", np.ones(identity.dim, np.float32) / identity.dim ** 0.5,
                                   4, None, 1, 1, {})])
        tx.release_uploads([kept, released])
        assert (tmp_path / "index" / "uploads" / "r.jpg").is_file()  # not before the commit
    assert not (tmp_path / "index" / "uploads" / "r.jpg").exists()
    assert (tmp_path / "index" / "uploads" / "k.jpg").is_file()  # a photo row refers to it
    assert store.count_products() == 2
    store.close()


def test_another_connection_holding_sqlites_lock_is_index_busy(tmp_path, identity, monkeypatch):
    """Another process's connection in a write transaction (an operator's ``sqlite3`` shell, say) makes a
    write fail with IndexBusy after SQLite's busy timeout, not with sqlite3's 'database is locked'."""
    import sqlite3
    import threading
    import time

    import indexer.database
    from indexer.records import IndexBusy

    monkeypatch.setattr(indexer.database, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    store = Store.create(tmp_path / "index", identity)
    blocker = sqlite3.connect(tmp_path / "index" / "catalogue.sqlite", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    failure: list[BaseException] = []

    def write(deadline=None):  # a thread of its own: its connection is opened with the short timeout
        try:
            with store.transaction(deadline) as tx:
                tx.upsert_products([Product("P1")])
        except BaseException as e:  # noqa: BLE001 (the test inspects it)
            failure.append(e)

    t = threading.Thread(target=write)
    t.start()
    t.join(30)
    assert len(failure) == 1 and isinstance(failure[0], IndexBusy), failure
    assert "write lock" in str(failure[0])
    # a deadline bounds SQLite's wait too, below its busy timeout
    monkeypatch.setattr(indexer.database, "SQLITE_BUSY_TIMEOUT_S", 30.0)
    t0 = time.monotonic()
    write(time.monotonic() + 0.3)
    assert len(failure) == 2 and isinstance(failure[1], IndexBusy) and time.monotonic() - t0 < 5, failure
    # ... and lengthens it: a deadline past the busy timeout waits out a stall shorter than the deadline
    monkeypatch.setattr(indexer.database, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    threading.Timer(0.8, lambda: blocker.execute("ROLLBACK")).start()
    write(time.monotonic() + 10)
    assert len(failure) == 2 and store.count_products() == 1, failure
    blocker.close()
    store.close()
