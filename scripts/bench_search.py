"""Search speed, recall and memory of Flat, HNSW and IVF-PQ on synthetic CLIP-like vectors.

    python scripts/bench_search.py [--quick] [--n 100000 1000000] [--queries 1000]
                                   [--types flat hnsw ivfpq ivfpq-plain exact-numpy]
                                   [--keep-blas-env] [--json]

For each size it builds every index type of ``indexer.ann`` with the parameters
``choose_index`` would give it, and prints build time, bytes per vector (serialised index
size / n), queries/s and recall@10 against exact search, with the speed-up over Flat
measured in the same run. IVF-PQ runs in both layouts: ``IVFPQ`` is FastScan (4-bit codes
scored with SIMD shuffles, what ``choose_index`` builds), ``IVFPQ-plain`` the 8-bit
``IndexIVFPQ`` of indexes built before it. Each approximate index is also run at half and
double its default knob (``ef_search``, ``nprobe``) to show the trade-off; the row marked
``*`` is the default, and the summary (and the JSON's ``ivfpq_speedup`` /
``ivfpq_recall_at_10``) takes, per IVF-PQ layout, the fewest lists visited that reach recall@10
>= 0.95 at the largest size.

The baseline is the plain library path: ``IndexFlatIP`` search, whose batched form is an sgemm
in the OpenBLAS that the faiss-cpu wheel bundles. Its speed depends on the BLAS kernel that
OpenBLAS picks for the CPU, so the script first prints the CPU, its SIMD flags that matter
(AMX, AVX512-BF16, AVX512-VNNI, AVX-512, AVX2), FAISS's SIMD level and each BLAS library
loaded with the kernel it runs (threadpoolctl), and warns when a kernel is older than the CPU.
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` override OpenBLAS's own choice: when either is set
the script re-executes itself without them (its own process only; ``--keep-blas-env`` keeps
them) and says so. The ``Exact-numpy`` row is the same exact search done with numpy's matrix
product (numpy's own, newer OpenBLAS) in chunks of the catalogue: a reference for what exact
search costs when the BLAS kernel suits the CPU; speed-ups are still against ``Flat``.

Data (:func:`embedding_like`): a seeded mixture of Gaussian clusters on the unit sphere.
Real image embeddings are neither uniform nor isotropic: photos form groups (product types,
styles) and their variance is concentrated in a minority of directions. So: ``clusters``
centres; every point is ``centre + spread * noise``, normalised, where centres and noise are
both drawn from N(0, C) with a power-law spectrum (eigenvalue i ~ 1/i, in a random rotation,
total variance 1), so about 70% of the variance lies in 64 of the 512 directions. With spread
1.0 a query's nearest neighbour among 100,000 has cosine ~0.68, its 10th ~0.60, and two random
points ~0. Cluster sizes follow a flat Dirichlet draw. Queries come from the same mixture with
another seed, so none is in the base set.

Timing: ``qps`` runs all queries in one batch, FAISS using every core (OpenMP), best of 3;
``qps 1`` sends the first 100 queries one call each, as the store does, best of 3. The same for
Flat, whose results are the ground truth. IVF-PQ's time includes re-ranking its candidates
with exact vectors read from a NumPy array; the store reads them from SQLite, which is slower.
``--quick`` runs 100,000 vectors only (about a minute on 2 cores). ``--json`` prints one JSON
object on the last line: ``{"rows": [...], "machine": {...}, "ivfpq_speedup": ..., ...}``.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchenv import BLAS_ENV, describe_machine, machine, reexec_without_blas_env  # noqa: E402

if __name__ == "__main__":  # before numpy and faiss load OpenBLAS; never when imported (tests)
    reexec_without_blas_env(__file__)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer import ann  # noqa: E402

#: The recall@10 an approximate index must reach (docs/PERFORMANCE.md, "Index scale").
TARGET_RECALL = 0.95
#: Queries sent one call each for the ``qps 1`` column (the store searches one query at a time).
SINGLE_QUERIES = 100
#: ``--types`` names, the row label of each and how to make its spec for ``n`` ``dim``-d vectors.
TYPES = {
    "flat": ("Flat", lambda n, dim: ann.IndexSpec(ann.FLAT)),
    "hnsw": ("HNSW", lambda n, dim: ann.hnsw_spec()),
    "ivfpq": ("IVFPQ", lambda n, dim: ann.ivfpq_spec(n, dim)),
    "ivfpq-plain": ("IVFPQ-plain", lambda n, dim: ann.ivfpq_spec(n, dim, fast_scan=False)),
    "exact-numpy": ("Exact-numpy", None),
}
#: Catalogue vectors per matrix product in :func:`exact_numpy` (1,000 queries: 256 MB of scores).
EXACT_CHUNK = 65_536


def embedding_like(n: int, dim: int = 512, *, clusters: int = 2000, spread: float = 1.0, seed: int = 0,
                   sample_seed: int = 1, chunk: int = 100_000) -> np.ndarray:
    """float32 ``(n, dim)`` unit vectors from the clustered mixture described in the module docstring.

    ``seed`` fixes the mixture (centres, spectrum, rotation, cluster weights); ``sample_seed`` the
    points drawn from it, so base vectors and queries share clusters but not points.
    """
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigen = 1.0 / np.arange(1, dim + 1)
    basis = (np.sqrt(eigen / eigen.sum())[:, None] * rotation.T).astype(np.float32)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(clusters))
    draw = np.random.default_rng([seed, sample_seed])
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[draw.choice(clusters, m, p=weights)]
        x += spread * (draw.standard_normal((m, dim), dtype=np.float32) @ basis)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def exact_numpy(base: np.ndarray, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product with numpy's matrix product, ``EXACT_CHUNK`` base rows at a
    time. Returns (scores float32 ``(q, k)``, positions in ``base`` int64 ``(q, k)``), best first."""
    top_s = np.full((len(queries), 0), -np.inf, np.float32)
    top_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(base), EXACT_CHUNK):
        scores = queries @ base[start:start + EXACT_CHUNK].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        top_s = np.concatenate([top_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        top_i = np.concatenate([top_i, part + start], axis=1)
        keep = np.argsort(-top_s, axis=1, kind="stable")[:, :k]
        top_s, top_i = np.take_along_axis(top_s, keep, axis=1), np.take_along_axis(top_i, keep, axis=1)
    return top_s, top_i


def best_time(fn, repeats: int = 3, budget_s: float = 10.0):
    """(best wall seconds, last result) of up to ``repeats`` calls, stopping once ``budget_s`` is spent."""
    best, result, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent >= budget_s:
            break
    return best, result


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def serialized_size(index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def bench_size(n: int, n_queries: int, dim: int, types: list[str], say) -> list[dict]:
    t0 = time.perf_counter()
    base = embedding_like(n, dim, sample_seed=1)
    queries = embedding_like(n_queries, dim, sample_seed=2)
    say(f"n={n:,}: generated {n:,} + {n_queries:,} vectors in {time.perf_counter() - t0:.1f} s")
    flat = bench_index("Flat", ann.IndexSpec(ann.FLAT), base, queries, None)
    rows = list(flat)
    for row in flat:
        say(_format(row))
    for name in types:
        if name == "flat":
            continue
        label, make = TYPES[name]
        bench = bench_exact_numpy(base, queries, flat[0]) if make is None else \
            bench_index(label, make(n, dim), base, queries, flat[0])
        for row in bench:
            rows.append(row)
            say(_format(row))
    for row in rows:
        del row["_found"]
    return rows


def bench_index(label: str, spec: ann.IndexSpec, base: np.ndarray, queries: np.ndarray, flat: dict | None) -> list[dict]:
    """Rows for one index type: its default knob, and half and double it for approximate types.

    ``flat`` None: this is the Flat run, whose queries/s and results are the baseline; else Flat's row.
    """
    n = len(base)
    ids = np.arange(n, dtype=np.int64)
    build_s, index = best_time(lambda: ann.build_index(spec, base, ids), repeats=1)
    per_vector = serialized_size(index) / n
    knob = {ann.HNSW: "ef_search", ann.IVFPQ: "nprobe"}.get(spec.type)
    default = spec.params.get(knob)
    lookup = lambda wanted: (wanted, base[wanted])  # noqa: E731
    single = queries[:SINGLE_QUERIES]
    rows = []
    for value in [None] if knob is None else [max(1, default // 2), default, 2 * default]:
        kw = {} if knob is None else {knob: value}
        seconds, (_, found) = best_time(lambda: ann.search(index, spec, queries, 10, lookup=lookup, **kw))
        one_s, _ = best_time(lambda: [ann.search(index, spec, single[i:i + 1], 10, lookup=lookup, **kw)
                                      for i in range(len(single))])
        qps, qps_1 = len(queries) / seconds, len(single) / one_s
        base_row = flat or {"qps": qps, "qps_1": qps_1, "_found": found}
        rows.append({"index": label, "n": n, "recall_at_10": round(recall_at_10(found, base_row["_found"]), 4),
                     "qps": round(qps, 1), "flat_qps": round(base_row["qps"], 1),
                     "speedup": round(qps / base_row["qps"], 2),
                     "qps_1": round(qps_1, 1), "flat_qps_1": round(base_row["qps_1"], 1),
                     "speedup_1": round(qps_1 / base_row["qps_1"], 2),
                     "bytes_per_vector": round(per_vector, 1), "build_s": round(build_s, 1),
                     "params": {**spec.params, **kw}, "default": value == default, "_found": found})
    return rows


def bench_exact_numpy(base: np.ndarray, queries: np.ndarray, flat: dict) -> list[dict]:
    """The ``Exact-numpy`` row: :func:`exact_numpy` timed as :func:`bench_index` times an index."""
    single = queries[:SINGLE_QUERIES]
    seconds, (_, found) = best_time(lambda: exact_numpy(base, queries))
    one_s, _ = best_time(lambda: [exact_numpy(base, single[i:i + 1]) for i in range(len(single))])
    qps, qps_1 = len(queries) / seconds, len(single) / one_s
    return [{"index": "Exact-numpy", "n": len(base), "recall_at_10": round(recall_at_10(found, flat["_found"]), 4),
             "qps": round(qps, 1), "flat_qps": round(flat["qps"], 1), "speedup": round(qps / flat["qps"], 2),
             "qps_1": round(qps_1, 1), "flat_qps_1": round(flat["qps_1"], 1),
             "speedup_1": round(qps_1 / flat["qps_1"], 2), "bytes_per_vector": 4.0 * base.shape[1],
             "build_s": 0.0, "params": {}, "default": True, "_found": found}]


def tuned(rows: list[dict], label: str) -> dict | None:
    """The row of ``label`` at the largest size with the fewest lists (or ``ef_search``) reaching
    :data:`TARGET_RECALL`, or its best-recall row when none does."""
    mine = [r for r in rows if r["index"] == label]
    if not mine:
        return None
    largest = [r for r in mine if r["n"] == max(r["n"] for r in mine)]
    reaching = [r for r in largest if r["recall_at_10"] >= TARGET_RECALL]
    if reaching:
        return min(reaching, key=lambda r: (r["params"].get("nprobe", 0), r["params"].get("ef_search", 0)))
    return max(largest, key=lambda r: r["recall_at_10"])


HEADER = (f"{'index':<11} {'knobs':<14} {'n':>9} {'recall@10':>9} {'qps':>9} {'flat qps':>9} {'speed-up':>8} "
          f"{'qps 1':>8} {'speed-up 1':>10} {'bytes/vec':>9} {'build s':>8}")


def _format(row: dict) -> str:
    knob = next((f"{k}={v}" for k, v in row["params"].items() if k in ("ef_search", "nprobe")), "")
    mark = "*" if row["default"] and knob else " "
    return (f"{row['index']:<11} {knob + mark:<14} {row['n']:>9,} {row['recall_at_10']:>9.3f} {row['qps']:>9,.0f} "
            f"{row['flat_qps']:>9,.0f} {row['speedup']:>7.1f}x {row['qps_1']:>8,.0f} {row['speedup_1']:>9.1f}x "
            f"{row['bytes_per_vector']:>9,.0f} {row['build_s']:>8.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 vectors only (about a minute)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="catalogue sizes (default 100000 1000000)")
    ap.add_argument("--queries", type=int, default=1000, help="queries per size (default 1000)")
    ap.add_argument("--dim", type=int, default=512, help="vector dimension (default 512, as CLIP ViT-B)")
    ap.add_argument("--types", nargs="+", choices=list(TYPES), default=list(TYPES),
                    help="index types to run (default all; Flat always runs: it is the baseline)")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help=f"keep {' / '.join(BLAS_ENV)} if set (default: re-run without them)")
    ap.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = ap.parse_args(argv)
    sizes = args.n or ([100_000] if args.quick else [100_000, 1_000_000])
    if min(sizes) < ann.IVFPQ_MIN_VECTORS or args.queries < 1:
        ap.error(f"--n must be at least {ann.IVFPQ_MIN_VECTORS} (IVF-PQ training) and --queries at least 1")
    info = machine()
    for line in describe_machine(info):
        print(line, flush=True)
    print(f"{args.queries} queries (qps 1: the first {min(SINGLE_QUERIES, args.queries)} one call each), k=10, "
          f"dim {args.dim}; * = default knob", flush=True)
    print(HEADER, flush=True)
    rows = []
    for n in sizes:
        rows += bench_size(n, args.queries, args.dim, args.types, say=lambda line: print(line, flush=True))
    summary = {}
    for key, label in (("ivfpq", "IVFPQ"), ("ivfpq_plain", "IVFPQ-plain"), ("hnsw", "HNSW")):
        row = tuned(rows, label)
        if row is not None:
            knob = "nprobe" if label.startswith("IVFPQ") else "ef_search"
            summary.update({f"{key}_speedup": row["speedup"], f"{key}_recall_at_10": row["recall_at_10"],
                            f"{key}_speedup_1": row["speedup_1"], f"{key}_{knob}": row["params"][knob]})
            print(f"{label} at n={row['n']:,}, fewest {knob} reaching recall@10 {TARGET_RECALL} "
                  f"({knob}={row['params'][knob]}): recall@10 {row['recall_at_10']:.3f}, {row['speedup']:.1f}x Flat's "
                  f"queries/s batched, {row['speedup_1']:.1f}x one query a call", flush=True)
    numpy_rows = [r for r in rows if r["index"] == "Exact-numpy" and r["n"] == max(sizes)]
    if numpy_rows:
        summary["exact_numpy_speedup"] = numpy_rows[0]["speedup"]
        print(f"Exact search with numpy's BLAS at n={max(sizes):,}: {numpy_rows[0]['speedup']:.1f}x Flat's "
              "queries/s batched (above 1: Flat's BLAS kernel is slower than this CPU allows)", flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "machine": info, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
