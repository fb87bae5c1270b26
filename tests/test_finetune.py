"""lookalike finetune: the multi-positive CLIP loss, augmentation, captions, and a short real run."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from indexer.finetune import FinetuneConfig, FinetuneError, augment, caption, finetune, multi_positive_clip_loss
from indexer.model import BUNDLED_MODELS_DIR, load_model

pytestmark = pytest.mark.integration


def test_same_caption_pairs_are_not_negatives():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(2, 8), dim=-1)
    # images 0 and 1 carry caption 0, image 2 caption 1, each image equal to its caption's embedding
    caption_ids = torch.tensor([0, 0, 1])
    images = text[caption_ids]
    scale = torch.tensor(100.0)
    loss = multi_positive_clip_loss(images, text, caption_ids, scale)
    # the best possible: i2t is ~0; t2i of caption 0 spreads over its 2 images (entropy log 2)
    assert float(loss) == pytest.approx(math.log(2) / 2 / 2, abs=1e-3)
    # a plain CLIP loss over the 3 (image, caption) pairs would push images 0 and 1 apart
    plain_text = text[caption_ids]
    logits = scale * images @ plain_text.t()
    plain = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    assert float(plain) > float(loss) + 0.2
    # gradient: the loss does not push two same-caption images apart
    img = images.clone().requires_grad_(True)
    multi_positive_clip_loss(img, text, caption_ids, scale).backward()
    assert torch.allclose(img.grad[0], img.grad[1], atol=1e-6)


def test_caption_templates_fill_columns_and_tidy():
    row = {"title": "Chaz Kangeroo Hoodie", "phrase": "men's hoodies & sweatshirts", "category": ""}
    assert caption("a photo of a {title}.", row) == "a photo of a Chaz Kangeroo Hoodie."
    assert caption("{title}, {phrase}.", row) == "Chaz Kangeroo Hoodie, men's hoodies & sweatshirts."
    assert caption("{title}, {category}.", row) == "Chaz Kangeroo Hoodie."
    assert caption("{missing} {title}", row) == "Chaz Kangeroo Hoodie"


def test_augment_keeps_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    a = augment(x, g, mean, std)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    b = augment(x, torch.Generator().manual_seed(0), mean, std)
    assert torch.equal(a, b)  # seeded
    assert not torch.allclose(a, x.float() / 255)  # it does change the images


@pytest.fixture(scope="module")
def small_catalogue(fixture_catalogue, tmp_path_factory):
    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()][:48]
    assert len(rows) == 48
    path = tmp_path_factory.mktemp("ft") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(catalogue, out, **kw):
    base = dict(catalogues=[str(catalogue)], out=str(out),
                model=str(BUNDLED_MODELS_DIR / "test-tiny" / "open_clip_config.json"), from_scratch=True,
                epochs=2, batch_size=16, lr=1e-3, warmup_steps=2, seed=3, workers=1, precision="fp32",
                templates=["a photo of a {title}.", "a photo of {category}."])
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_writes_a_loadable_model_deterministically(small_catalogue, tmp_path):
    a = finetune(_cfg(small_catalogue, tmp_path / "a"), progress=False)
    b = finetune(_cfg(small_catalogue, tmp_path / "b"), progress=False)
    assert a["steps"] == b["steps"] == 6
    assert a["loss_every_100_steps"] == b["loss_every_100_steps"]
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "MODEL_CARD.md", "training.json"):
        assert (tmp_path / "a" / name).is_file()
    ma, mb = load_model(str(tmp_path / "a"), None, "cpu"), load_model(str(tmp_path / "b"), None, "cpu")
    assert ma.identity.weights_sha256 == mb.identity.weights_sha256
    tiny = load_model("test-tiny", None, "cpu")
    assert ma.identity.weights_sha256 != tiny.identity.weights_sha256
    v = ma.embed_texts(["a photo of a hoodie."])
    assert v.shape == (1, 64) and np.isclose(np.linalg.norm(v), 1, atol=1e-3)
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_finetune_learns(small_catalogue, tmp_path):
    s = finetune(_cfg(small_catalogue, tmp_path / "m", epochs=12, lr=3e-3), progress=False)
    first, last = s["loss_every_100_steps"][0], s["final_loss"]
    assert last < first - 0.3, (first, last)


def test_finetune_resumes_from_its_checkpoint(small_catalogue, tmp_path, monkeypatch):
    import indexer.finetune as ft

    full = finetune(_cfg(small_catalogue, tmp_path / "full", epochs=3), progress=False)
    out = tmp_path / "r"
    save = ft._atomic_torch_save

    def save_then_die(obj, path):  # the process is killed right after its first checkpoint
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(small_catalogue, out, epochs=3), progress=False)
    monkeypatch.setattr(ft, "_atomic_torch_save", save)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3  # one epoch of 3 steps
    resumed = finetune(_cfg(small_catalogue, out, epochs=3), progress=False)
    assert resumed["steps"] == full["steps"]
    assert resumed["loss_every_100_steps"] == full["loss_every_100_steps"]
    a = load_model(str(tmp_path / "full"), None, "cpu").identity.weights_sha256
    assert load_model(str(out), None, "cpu").identity.weights_sha256 == a


def test_checkpoint_of_other_settings_is_refused(small_catalogue, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    torch.save({"config_key": "something else"}, out / "checkpoint.pt")
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(_cfg(small_catalogue, out), progress=False)


def test_finetune_from_lookalike_base(small_catalogue, tmp_path):
    """Fine-tuning the bundled lookalike-base trains its projection and text layers, keeps the frozen
    pretrained trunk and the GloVe table as they were, and writes a folder that loads everywhere."""
    cfg = FinetuneConfig(catalogues=[str(small_catalogue)], out=str(tmp_path / "ft"), model="lookalike-base",
                         epochs=1, batch_size=16, lr=1e-4, warmup_steps=1, seed=0, workers=1, precision="fp32",
                         templates=["a photo of a {title}."])
    summary = finetune(cfg, progress=False)
    assert summary["steps"] == 3
    before = load_model("lookalike-base", None, "cpu", backend="torch")
    after = load_model(str(tmp_path / "ft"), None, "cpu", backend="torch")
    assert after.identity.dim == 512 and after.identity.weights_sha256 != before.identity.weights_sha256
    assert after.calibration == {}  # thresholds measured for other weights do not carry over
    b, a = before.model.state_dict(), after.model.state_dict()
    assert torch.equal(b["text.glove_q"], a["text.glove_q"])
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("visual.trunk."))
    assert not torch.equal(b["visual.linear.weight"], a["visual.linear.weight"])
    v = after.embed_texts(["a photo of a hoodie."])
    assert v.shape == (1, 512) and np.isclose(np.linalg.norm(v), 1, atol=1e-3)
