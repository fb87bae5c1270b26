"""Speed of the audit's near-duplicate grouping on synthetic vectors, with planted near-duplicate groups.

    python scripts/bench_audit.py [--n 100000] [--dim 512] [--groups 1000] [--types flat hnsw]
                                  [--no-baseline] [--json]

Data: ``--n`` unit vectors from ``scripts/bench_search.py``'s clustered CLIP-like mixture
(``embedding_like``: a photo's nearest neighbour among 100,000 has cosine ~0.68, so none of them is
a near-duplicate), of which ``--groups`` groups of 2 to 5 vectors are planted near-duplicates: a
vector and copies of it with small noise (cosine 0.97 to 0.99), each vector its own product.

For each FAISS index type it builds the index the store would hold (``indexer.ann.build_index``
inside an ``indexer.vectors.VectorIndex``), then times the audit's own code path:
``indexer.audit.audit_index`` (for a Flat index over ``EXACT_AUDIT_UP_TO`` photos, the build of a
temporary HNSW graph, counted in the audit's time), ``indexer.audit.near_duplicate_pairs`` (one k-NN
query per vector, 16 neighbours, cosine >= 0.95) and ``indexer.audit.connected_components``. It
checks the planted groups are found (a planted group
is found when one component is exactly its vectors) and that no other component appears. The
baseline, in the same run, is the O(N^2) method the audit avoids: every pair scored by numpy's matrix
product in blocks; the ratio is baseline time / audit time.

The 1M estimate: with Flat queried directly (up to ``EXACT_AUDIT_UP_TO`` photos), the audit's time
grows as N^2 (every query scans every vector): ``t(1M) = t(n) * (1e6 / n)^2``. With a graph (an
HNSW index, what ``choose_index`` picks from 200,000 photos on when it fits the memory budget, or
a larger Flat index through its temporary graph, whose build is counted too), a query visits
O(log N) nodes at a fixed ``ef_search``:
``t(1M) = t(n) * (1e6 / n) * log(1e6) / log(n)``; an HNSW index itself is built by ``lookalike
index``, not by the audit, so its build time is reported but not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_search import describe_machine, embedding_like, machine  # noqa: E402

from indexer import ann  # noqa: E402
from indexer.audit import EXACT_AUDIT_UP_TO, audit_index, connected_components, near_duplicate_pairs  # noqa: E402
from indexer.vectors import VectorIndex  # noqa: E402

THRESHOLD = 0.95
NEIGHBOURS = 16
BATCH = 4096
BLOCK = 8192


def planted_data(n: int, dim: int, groups: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """(float32 ``(n, dim)`` unit vectors, planted groups as lists of row numbers)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, groups)
    base = embedding_like(n - int(sizes.sum() - groups), dim, seed=seed)
    originals = rng.choice(len(base), groups, replace=False)
    copies, planted, row = [], [], len(base)
    for orig, size in zip(originals, sizes):
        members = [int(orig)]
        for _ in range(size - 1):
            noise = rng.standard_normal(dim).astype(np.float32)
            noise /= np.linalg.norm(noise)
            v = base[orig] + rng.uniform(0.14, 0.24) * noise  # cosine ~0.97-0.99 to the original
            copies.append(v / np.linalg.norm(v))
            members.append(row)
            row += 1
        planted.append(members)
    return np.concatenate([base, np.stack(copies).astype(np.float32)]), planted


def batches(vecs: np.ndarray):
    for start in range(0, len(vecs), BATCH):
        yield np.arange(start, min(start + BATCH, len(vecs)), dtype=np.int64), vecs[start:start + BATCH]


def owner_of(ids: np.ndarray) -> np.ndarray:
    return ids  # every vector is its own product


def audit_groups(vectors: VectorIndex, vecs: np.ndarray) -> tuple[dict, float, int]:
    """The audit's near-duplicate grouping, timed: the index it queries (a temporary HNSW graph for a
    large Flat index, :func:`indexer.audit.audit_index`), the pairs, the components."""
    t0 = time.perf_counter()
    a, b, _ = near_duplicate_pairs(audit_index(vectors), batches(vecs), owner_of, THRESHOLD, NEIGHBOURS)
    groups = connected_components(a, b)
    return groups, time.perf_counter() - t0, len(a)


def brute_force_pairs(vecs: np.ndarray) -> tuple[int, float]:
    """The O(N^2) baseline: every pair's cosine (numpy matrix product, blocks of BLOCK rows)."""
    t0 = time.perf_counter()
    pairs = 0
    for start in range(0, len(vecs), BLOCK):
        sims = vecs[start:start + BLOCK] @ vecs.T
        r, c = np.nonzero(sims >= THRESHOLD)
        pairs += int(np.count_nonzero(c > r + start))
    return pairs, time.perf_counter() - t0


def check(groups: dict, planted: list[list[int]]) -> dict:
    found = {tuple(m) for m in groups.values()}
    want = {tuple(sorted(g)) for g in planted}
    return {"planted_groups": len(want), "found_exactly": len(want & found), "other_components": len(found - want),
            "recall": round(len(want & found) / len(want), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the O(N^2) numpy baseline")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    info = machine()
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    for line in describe_machine(info):
        say(line)
    vecs, planted = planted_data(args.n, args.dim, args.groups)
    ids = np.arange(len(vecs), dtype=np.int64)
    result = {"n": len(vecs), "dim": args.dim, "threshold": THRESHOLD, "neighbours": NEIGHBOURS, "rows": []}
    if not args.no_baseline:
        pairs, seconds = brute_force_pairs(vecs)
        result["baseline"] = {"method": "numpy all pairs", "seconds": round(seconds, 1), "pairs": pairs}
        say(f"baseline (all pairs, numpy): {seconds:.1f} s, {pairs} pairs >= {THRESHOLD}")
    for name in args.types:
        spec = ann.IndexSpec(ann.FLAT) if name == "flat" else ann.hnsw_spec()
        t0 = time.perf_counter()
        vectors = VectorIndex(args.dim)
        vectors.replace(ann.build_index(spec, vecs, ids), spec, 0, ids)
        build = time.perf_counter() - t0
        groups, seconds, pairs = audit_groups(vectors, vecs)
        scale = 1e6 / len(vecs)
        exact = name == "flat" and len(vecs) <= EXACT_AUDIT_UP_TO  # else the audit queried a temporary graph
        estimate = seconds * scale**2 if exact else seconds * scale * math.log(1e6) / math.log(len(vecs))
        row = {"index": spec.type, "build_seconds": round(build, 1), "audit_seconds": round(seconds, 1),
               "pairs": pairs, **check(groups, planted), "estimate_1m_seconds": round(estimate),
               "estimate_formula": "t * (1e6/n)^2" if exact else "t * (1e6/n) * ln(1e6)/ln(n)"}
        if "baseline" in result:
            row["speedup_vs_baseline"] = round(result["baseline"]["seconds"] / seconds, 2)
        result["rows"].append(row)
        say(f"{spec.type}: build {build:.1f} s, audit {seconds:.1f} s, {pairs} pairs, planted groups found "
            f"{row['found_exactly']}/{row['planted_groups']}, other components {row['other_components']}; "
            f"1M estimate {estimate / 60:.1f} min ({row['estimate_formula']})")
    result["machine"] = info
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
