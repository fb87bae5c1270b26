"""The benchmark scripts' short modes, run as a user runs them: they finish, print one JSON object
on the last line with the documented keys, and the fast paths they measure give the same answers as
the baselines they are compared with. Speed itself is never asserted here (see docs/PERFORMANCE.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system


def _run(script: str, *args: str, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_index_fast_pipeline_agrees_with_the_plain_fp32_loop(datasets_dir):
    """`lookalike index` (decode workers, JPEG draft mode, bf16 where the CPU has it) against
    open_clip in a plain fp32 loop, on the same Magento and CIFAR-10 photos and ViT-B-32 weights."""
    r = _run("bench_index.py", "--images", "64")
    for key in ("baseline_images_per_s", "images_per_s", "ratio", "top10_overlap", "mean_cosine"):
        assert isinstance(r[key], float), key
    assert set(r["sets"]) == {"magento", "cifar10"}
    for s in r["sets"].values():
        assert s["images"] == 64 and s["images_per_s"] > 0 and s["baseline_images_per_s"] > 0
        # bf16 and draft-mode decoding change embeddings a little, never the neighbours much
        assert s["mean_cosine"] >= 0.995, s
        assert s["top10_overlap"] >= 0.9, s


def test_bench_query_serves_with_and_without_micro_batching(fixture_data, tmp_path):
    """On the generated catalogue's JPEGs, laid out where the script looks for photos
    (``DATASETS/magento/images``): the script's function, not its figures, is under test."""
    (tmp_path / "magento").mkdir()
    (tmp_path / "magento" / "images").symlink_to(fixture_data.root / "images", target_is_directory=True)
    r = _run("bench_query.py", "--quick", "--model", "test-tiny", "--seconds", "1", "--datasets", str(tmp_path))
    for key in ("image_p50_ms", "image_p99_ms", "text_p50_ms", "cold_start_s"):
        assert r[key] > 0, key
    assert r["image_p99_ms"] >= r["image_p50_ms"]
    assert set(r["qps"]) == {"1", "4", "16"}
    for level in r["qps"].values():
        assert level["batched"] > 0 and level["unbatched"] > 0 and level["one_stream"] > 0
    assert set(r["modes"]) == {"one_stream", "unbatched", "batched"}
    assert r["ceiling"]["streams"] >= 1
    for mode in r["modes"].values():
        assert all(lv["errors"] == 0 for lv in mode["levels"])
