"""Tests for indexer.ann: choosing, building and searching Flat, HNSW and IVF-PQ indexes.

Recall is measured against exact search on 20,000 vectors from the clustered generator of
scripts/bench_search.py (64-d, so the test stays fast); the thresholds sit a few points under
what the defaults reach there, so they catch a broken index or knob, not noise.
"""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import ann

N, DIM = 20_000, 64


@pytest.fixture(scope="module")
def data():
    spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[1] / "scripts" / "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = bench.embedding_like(N, DIM, clusters=200, sample_seed=1)
    queries = bench.embedding_like(200, DIM, clusters=200, sample_seed=2)
    ids = np.arange(N, dtype=np.int64) * 7 + 3  # not positions: the index must keep our ids
    exact = faiss.IndexFlatIP(DIM)
    exact.add(base)
    _, truth = exact.search(queries, 10)
    return base, queries, ids, ids[truth]


def lookup_in(base, ids):
    def lookup(wanted):
        wanted = wanted[np.isin(wanted, ids)]
        return wanted, base[(wanted - 3) // 7]

    return lookup


def recall(found, truth) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def built(data):
    base, _, ids, _ = data
    specs = {ann.FLAT: ann.IndexSpec(ann.FLAT), ann.HNSW: ann.hnsw_spec(), ann.IVFPQ: ann.ivfpq_spec(N, DIM)}
    return {t: (spec, ann.build_index(spec, base, ids)) for t, spec in specs.items()}


# --------------------------------------------------------------------------- choosing


def test_auto_keeps_exact_search_below_the_threshold():
    assert ann.choose_index(0, 512).type == ann.FLAT
    assert ann.choose_index(ann.EXACT_UP_TO - 1, 512).type == ann.FLAT


def test_auto_picks_hnsw_when_it_fits_the_budget_else_ivfpq():
    n = 1_000_000
    hnsw_bytes = n * ann.bytes_per_vector(ann.hnsw_spec(), 512, n)
    assert ann.choose_index(n, 512, memory_budget_bytes=int(hnsw_bytes) + 1) == ann.hnsw_spec()
    small = ann.choose_index(n, 512, memory_budget_bytes=int(hnsw_bytes) - 1)
    assert small.type == ann.IVFPQ
    assert small.params["nlist"] == 1024 and small.params["pq_m"] == 128 and small.params["nprobe"] == 32
    # with the default 4 GiB: HNSW up to ~1.8M CLIP vectors, IVF-PQ beyond
    assert ann.choose_index(1_500_000, 512).type == ann.HNSW
    assert ann.choose_index(3_000_000, 512).type == ann.IVFPQ


def test_explicit_requests_win_over_size_and_budget():
    assert ann.choose_index(10, 512, requested="hnsw").type == ann.HNSW
    assert ann.choose_index(10**7, 512, requested="FLAT").type == ann.FLAT
    assert ann.choose_index(10**6, 512, memory_budget_bytes=1, requested="hnsw").type == ann.HNSW
    assert ann.choose_index(50_000, 512, requested="ivfpq").type == ann.IVFPQ


def test_ivfpq_needs_enough_vectors_to_train_else_flat():
    assert ann.choose_index(ann.IVFPQ_MIN_VECTORS - 1, 512, requested="ivfpq").type == ann.FLAT
    assert ann.choose_index(ann.IVFPQ_MIN_VECTORS, 512, requested="ivfpq").type == ann.IVFPQ


def test_unknown_request_is_a_value_error():
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        ann.choose_index(10, 512, requested="annoy")


def test_ivfpq_parameters_follow_the_catalogue_size():
    assert ann.ivfpq_spec(100_000, 512).params["nlist"] == 128
    assert ann.ivfpq_spec(4_000_000, 512).params["nlist"] == 2048  # sqrt(n) above 1M
    p = ann.ivfpq_spec(20_000, 768).params
    assert p["pq_m"] == 192  # 4 dimensions per sub-quantiser
    assert p["nlist"] <= 20_000 // ann.IVF_TRAIN_PER_LIST


def test_bytes_per_vector_matches_the_serialised_index(built):
    for spec, index in built.values():
        measured = faiss.serialize_index(index).size / N
        assert ann.bytes_per_vector(spec, DIM, N) == pytest.approx(measured, rel=0.05), spec.type


# --------------------------------------------------------------------------- searching


def test_flat_is_exact(data, built):
    _, queries, _, truth = data
    spec, index = built[ann.FLAT]
    _, found = ann.search(index, spec, queries, 10)
    assert recall(found, truth) == 1.0


@pytest.mark.parametrize("kind, minimum", [(ann.HNSW, 0.95), (ann.IVFPQ, 0.93)])
def test_approximate_recall_at_10_with_default_knobs(data, built, kind, minimum):
    base, queries, ids, truth = data
    spec, index = built[kind]
    scores, found = ann.search(index, spec, queries, 10, lookup=lookup_in(base, ids))
    assert recall(found, truth) >= minimum
    # scores are exact cosines of the ids returned (IVF-PQ re-ranks with the exact vectors)
    expected = np.einsum("qd,qkd->qk", queries, base[(found - 3) // 7])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind, knob, low, high", [(ann.HNSW, "ef_search", 1, 256), (ann.IVFPQ, "nprobe", 1, 64)])
def test_knobs_trade_recall_per_call_without_changing_the_index(data, built, kind, knob, low, high):
    base, queries, ids, truth = data
    spec, index = built[kind]
    lookup = lookup_in(base, ids)

    def run(value):
        return ann.search(index, spec, queries, 10, lookup=lookup, **{knob: value})[1]

    default = recall(ann.search(index, spec, queries, 10, lookup=lookup)[1], truth)
    assert recall(run(low), truth) < default - 0.05 < recall(run(high), truth)
    inner = faiss.downcast_index(index.index) if kind == ann.HNSW else index
    stored = inner.hnsw.efSearch if kind == ann.HNSW else inner.nprobe
    assert stored == spec.params[knob]
    # concurrent searches with different knobs: each gets exactly what it gets alone
    alone = {v: run(v) for v in (low, high)}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda v: (v, run(v)), [low, high] * 6))
    for value, found in results:
        np.testing.assert_array_equal(found, alone[value])


def test_knobs_are_ignored_by_flat(data, built):
    _, queries, _, _ = data
    spec, index = built[ann.FLAT]
    plain = ann.search(index, spec, queries, 10)[1]
    np.testing.assert_array_equal(ann.search(index, spec, queries, 10, ef_search=1, nprobe=1)[1], plain)


def test_ivfpq_search_needs_a_lookup(data, built):
    spec, index = built[ann.IVFPQ]
    with pytest.raises(ValueError, match="lookup"):
        ann.search(index, spec, data[1], 10)


def test_rerank_drops_ids_the_lookup_does_not_know():
    queries = np.eye(4, dtype=np.float32)[:1]
    vectors = {10: [0.5, 0.5, 0.5, 0.5], 11: [1, 0, 0, 0], 13: [0, 1, 0, 0]}

    def lookup(wanted):
        known = np.array([i for i in wanted if i in vectors], np.int64)
        return known, np.array([vectors[i] for i in known], np.float32).reshape(-1, 4)

    scores, ids = ann.rerank(queries, np.array([[13, 12, 10, 11, -1]]), 4, lookup)
    assert ids.tolist() == [[11, 10, 13, -1]]
    np.testing.assert_allclose(scores[0, :3], [1.0, 0.5, 0.0])
    assert scores[0, 3] == -np.inf


# --------------------------------------------------------------------------- ids and storage


def test_ids_survive_serialisation_and_describe_reads_the_layout(data, built):
    _, _, ids, _ = data
    for spec, index in built.values():
        copy = faiss.deserialize_index(faiss.serialize_index(index))
        assert ann.describe(copy) == ann.IndexSpec(spec.type, spec.structure())
        np.testing.assert_array_equal(np.sort(ann.held_ids(copy)), ids)
    assert ann.describe(faiss.IndexFlatL2(8)) is None


def test_removal_leaves_tombstones_only_in_hnsw(data, built):
    _, _, ids, _ = data
    gone = ids[:50]
    for spec, index in built.values():
        index = faiss.deserialize_index(faiss.serialize_index(index))
        ann.remove_ids(index, spec, gone)
        held = ann.held_ids(index)
        assert spec.removes == (not np.isin(gone, held).any()), spec.type
        assert len(held) == (N - 50 if spec.removes else N)


def test_stored_vectors_and_reconstruction(data, built):
    base, _, ids, _ = data
    for kind in (ann.FLAT, ann.HNSW):
        _, index = built[kind]
        stored = ann.stored_vectors(index)
        np.testing.assert_array_equal(stored, base[(ann.held_ids(index) - 3) // 7])
    spec, index = built[ann.IVFPQ]
    assert ann.stored_vectors(index) is None
    copy = faiss.deserialize_index(faiss.serialize_index(index))
    decoded = ann.reconstruct(copy, ids[:500])
    cosine = (decoded * base[:500]).sum(1) / np.linalg.norm(decoded, axis=1)
    assert cosine.min() > 0.8


def test_ivfpq_with_too_little_training_data_is_a_value_error():
    spec = ann.ivfpq_spec(100_000, 64)
    with pytest.raises(ValueError, match="training vectors"):
        ann.new_index(spec, 64, np.zeros((10, 64), np.float32))

