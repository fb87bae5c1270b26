"""The int8 image tower (OpenVINO + NNCF, indexer/quantize.py): calibrated on the first photos it embeds,
checked against fp32, cached; rejected towers run fp32; and the per-CPU choice of ``--precision auto``."""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from indexer import model as model_mod
from indexer import quantize
from indexer.images import open_image
from indexer.model import ModelLoadError, load_model, resolve_precision

pytestmark = pytest.mark.integration


def _photos(datasets_dir, n):
    files = sorted((datasets_dir / "magento" / "images").rglob("*.jpg"))[:n]
    assert len(files) == n
    return [open_image(f, draft_size=448) for f in files]


def _verdict(cache):
    (path,) = (cache / "openvino").glob("*-int8.json")
    return json.loads(path.read_text())


def _pixels(model, photos):
    return torch.stack([model.preprocess(im) for im in photos])


@pytest.fixture
def tiny_int8_accepted(monkeypatch):
    """The tests of *when* an int8 tower is calibrated and used run test-tiny, whose random weights
    quantise worse on CPUs without VNNI (OpenVINO's AVX2 int8 kernels: mean cosine 0.991 to fp32 on an
    AVX2-only AMD EPYC, under the 0.995 bar), so the check would reject it there and those tests would
    test nothing. They lower the bar; the bar itself is tested at its real value on ViT-B-32
    (test_int8_tower_is_calibrated_checked_against_fp32_and_cached) and on rejection below."""
    monkeypatch.setattr(quantize, "MIN_MEAN_COSINE", 0.95)
    monkeypatch.setattr(quantize, "MIN_COSINE", 0.9)


def test_int8_tower_is_calibrated_checked_against_fp32_and_cached(datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    photos = _photos(datasets_dir, quantize.CALIBRATION_PHOTOS + 16)
    fp32 = load_model("ViT-B-32", None, "cpu", precision="fp32", backend="torch")
    ref = fp32.embed_images(photos, batch_size=16)

    int8 = load_model("ViT-B-32", None, "cpu", precision="int8")
    assert int8.precision == "fp32" and int8.needs_calibration  # nothing calibrated for these weights yet
    assert int8.set_streams(2) == 2  # a server's multi-stream twin, made before calibration: it must follow it
    np.testing.assert_allclose(int8.embed_images(photos[:4]), ref[:4], atol=1e-4)  # meanwhile: fp32
    assert int8.calibrate(_pixels(int8, photos[:quantize.CALIBRATION_PHOTOS])) == "int8"
    assert int8.precision == "int8" and not int8.needs_calibration
    got = int8.embed_images(photos, batch_size=16)
    cos = np.sum(ref * got, axis=1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98, (cos.mean(), cos.min())
    assert not np.allclose(ref, got, atol=1e-4)  # it really is another (quantised) model
    # concurrent calls run on the multi-stream twin, now the int8 tower too
    pixels = _pixels(int8, photos[:4])
    start = threading.Barrier(len(pixels))

    def embed_one(x):
        start.wait()
        return int8.embed_image_tensors(x[None])[0]

    with ThreadPoolExecutor(len(pixels)) as pool:
        concurrent = np.stack(list(pool.map(embed_one, pixels)))
    assert not int8.image_encoder._idle_parallel.empty()
    assert np.sum(concurrent * got[:4], axis=1).min() >= 0.999
    assert not np.allclose(concurrent, ref[:4], atol=1e-4)
    verdict = _verdict(tmp_path)
    assert verdict["accepted"] and verdict["mean_cosine"] >= quantize.MIN_MEAN_COSINE
    assert verdict["photos"] == quantize.CALIBRATION_PHOTOS

    # the next load reads the cached int8 model: no calibration, the same embeddings from the first photo on
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("calibrated again"))
    again = load_model("ViT-B-32", None, "cpu", precision="int8")
    assert again.precision == "int8" and not again.needs_calibration
    np.testing.assert_allclose(again.embed_images(photos[:3]), got[:3], atol=1e-5)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_int8_tower_that_disagrees_with_fp32_is_rejected_and_runs_fp32(datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(quantize, "MIN_MEAN_COSINE", 1.01)  # no quantised model can pass this
    photos = _photos(datasets_dir, quantize.CALIBRATION_PHOTOS)
    fp32 = load_model("test-tiny", None, "cpu", precision="fp32", backend="openvino")
    int8 = load_model("test-tiny", None, "cpu", precision="int8")
    # a handler on the module's logger itself (pytest's caplog missed records after NNCF's first import)
    records, logger = _Records(), logging.getLogger("indexer.backends")
    logger.addHandler(records)
    try:
        assert int8.calibrate(_pixels(int8, photos)) == "fp32"
    finally:
        logger.removeHandler(records)
    assert any("int8 image tower rejected" in m for m in records.messages), records.messages
    assert int8.precision == "fp32" and not int8.needs_calibration
    np.testing.assert_allclose(int8.embed_images(photos), fp32.embed_images(photos, batch_size=16), atol=1e-5)
    verdict = _verdict(tmp_path)
    assert verdict["accepted"] is False and "needs >= 1.01" in verdict["reason"]
    assert not list((tmp_path / "openvino").glob("*-int8.xml"))  # a rejected model is not kept
    # remembered: later loads run fp32 at once and never calibrate again
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("calibrated again"))
    later = load_model("test-tiny", None, "cpu", precision="int8")
    assert later.precision == "fp32" and not later.needs_calibration
    assert later.calibrate(_pixels(later, photos)) == "fp32"


def test_auto_int8_keeps_the_fastest_tower_that_passed(datasets_dir, tmp_path, monkeypatch, tiny_int8_accepted):
    """``auto`` on a CPU without AMX (simulated): the calibration times fp32, bf16 and int8 on its photos and
    keeps the fastest that passed the check; the choice is remembered with the calibration."""
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(model_mod, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(model_mod, "cpu_has_vnni", lambda: True)
    photos = _photos(datasets_dir, quantize.CALIBRATION_PHOTOS)
    model = load_model("test-tiny", None, "cpu")  # precision auto
    assert model.needs_calibration
    chosen = model.calibrate(_pixels(model, photos))
    verdict = _verdict(tmp_path)
    speeds = verdict["images_per_s"]
    assert {"fp32", "int8"} <= set(speeds) and all(v > 0 for v in speeds.values())
    assert chosen == model.precision == verdict["fastest"] == max(speeds, key=speeds.get)
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("calibrated again"))
    again = load_model("test-tiny", None, "cpu")
    assert again.precision == chosen and not again.needs_calibration
    # an explicit int8 runs int8 whatever was fastest
    assert load_model("test-tiny", None, "cpu", precision="int8").precision == "int8"
    # a cache shared with another CPU: that CPU's timings do not apply here, the checked int8 tower does
    (path,) = (tmp_path / "openvino").glob("*-int8.json")
    path.write_text(json.dumps({**verdict, "cpu": "another CPU", "fastest": "fp32"}))
    assert load_model("test-tiny", None, "cpu").precision == "int8"


def test_too_few_photos_leave_the_tower_uncalibrated(datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    photos = _photos(datasets_dir, quantize.MIN_CALIBRATION_PHOTOS - 1)
    int8 = load_model("test-tiny", None, "cpu", precision="int8")
    assert int8.calibrate(_pixels(int8, photos)) == "fp32" and int8.needs_calibration
    assert not list((tmp_path / "openvino").glob("*-int8.json"))  # nothing decided yet


def test_indexing_calibrates_before_embedding_so_every_vector_comes_from_one_tower(fixture_catalogue, tmp_path,
                                                                                    monkeypatch, tiny_int8_accepted):
    """Small batches (8 photos): the pipeline decodes the first 64 photos, calibrates, then embeds them all, so
    every stored vector is what the int8 tower gives for its photo (a mixed fp32/int8 index would not be)."""
    from indexer.catalogue import read_catalogue
    from indexer.pipeline import embed_paths, index_catalogue
    from indexer.store import Store

    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("test-tiny", None, "cpu", precision="int8")
    catalogue = read_catalogue(fixture_catalogue)
    with Store.create(tmp_path / "idx", model.identity) as store:
        report = index_catalogue(catalogue, store, model, workers=0, batch_size=8, progress=False)
    assert report.indexed == len(catalogue.rows) >= quantize.CALIBRATION_PHOTOS
    assert model.precision == "int8" and not model.needs_calibration
    paths = [r.source for r in catalogue.rows]
    ok, vecs, errors = embed_paths(model, paths)
    assert not errors
    db = sqlite3.connect(tmp_path / "idx" / "catalogue.sqlite")
    stored = {src: np.frombuffer(blob, np.float32) for src, blob in db.execute("SELECT source, vector FROM photos")}
    db.close()
    for path, vec in zip(ok, vecs):
        np.testing.assert_allclose(stored[path], vec, atol=1e-5, err_msg=path)


def test_server_calibrates_on_the_index_photos_before_serving(fixture_index, tmp_path, monkeypatch, tiny_int8_accepted):
    """A server whose int8 tower is not calibrated yet calibrates it on the served index's photos while
    loading, so its first answer already comes from the int8 tower."""
    from server.engine import load_engine
    from server.observability import Metrics
    from server.settings import ServerSettings

    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("test-tiny", None, "cpu", precision="int8")
    assert model.needs_calibration
    engine = load_engine(ServerSettings(index=fixture_index), Metrics(), model)
    try:
        assert not model.needs_calibration and model.precision == "int8"
        assert _verdict(tmp_path / "cache")["photos"] == quantize.CALIBRATION_PHOTOS
    finally:
        engine.close()


def test_precision_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for amx, vnni, bf16, have_int8, backend, want in [
        (True, True, True, True, "auto", "bf16"),        # AMX: bf16 (the Xeon path, unchanged)
        (False, True, True, True, "auto", "int8"),       # AVX512-BF16/VNNI without AMX (AMD EPYC): int8
        (False, True, True, True, "openvino", "int8"),
        (False, True, True, True, "torch", "bf16"),      # int8 runs on OpenVINO only
        (False, True, True, False, "auto", "bf16"),      # NNCF not installed
        (False, True, False, True, "auto", "int8"),      # VNNI only (Cascade Lake, AVX-VNNI)
        (False, False, False, True, "auto", "fp32"),     # neither
    ]:
        monkeypatch.setattr(model_mod, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(model_mod, "cpu_has_vnni", lambda vnni=vnni: vnni)
        monkeypatch.setattr(model_mod, "cpu_has_fast_bf16", lambda bf16=bf16, amx=amx: bf16 or amx)
        monkeypatch.setattr(model_mod, "int8_available", lambda have=have_int8: have)
        assert resolve_precision("auto", cpu, backend) == want, (amx, vnni, bf16, have_int8, backend)
    assert resolve_precision("auto", torch.device("cuda"), "auto") == "fp16"


def test_onednn_isa_cap_turns_amx_off(monkeypatch):
    """``ONEDNN_MAX_CPU_ISA`` below AMX (how PERFORMANCE.md measures the no-AMX path on an AMX Xeon)
    makes the choice as on a CPU without AMX."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not model_mod.cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not model_mod.cpu_has_amx() and not model_mod.cpu_has_vnni() and not model_mod.cpu_has_fast_bf16()


def test_int8_errors_are_clear(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU with the openvino back-end"):
        resolve_precision("int8", cpu, "torch")
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"), "auto")
    monkeypatch.setattr(model_mod, "int8_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"pip install 'lookalike\[int8\]'"):
        load_model("test-tiny", None, "cpu", precision="int8")
