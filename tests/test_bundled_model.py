"""The bundled offline model loads and keeps its measured quality on fixed subsets, so a broken
model file or a preprocessing regression fails CI (full figures: MODEL_CARD.md, lookalike eval)."""
import json

import pytest

from indexer.evaluate import eval_cifar10, eval_fashion_mnist, eval_magento
from indexer.model import load_model


@pytest.fixture(scope="module")
def mini():
    return load_model("lookalike-mini", None, "cpu")


def test_it_loads_by_name(mini):
    assert mini.identity.dim == 256 and mini.identity.image_size == 64
    assert mini.identity.name == "lookalike-mini"


def test_zero_shot_targets_on_1000_test_images(mini, datasets_dir):
    cifar, n = eval_cifar10(mini, datasets_dir, limit=1000)
    assert n == 1000 and cifar >= 0.75, cifar  # issue target 0.75; 0.790 on all 10,000
    fashion, n = eval_fashion_mnist(mini, datasets_dir, limit=1000)
    assert n == 1000 and fashion >= 0.85, fashion  # issue target 0.85; 0.921 on all 10,000


def test_magento_retrieval(mini, datasets_dir):
    from conftest import _load_script
    from indexer.model import BUNDLED_MODELS_DIR

    split = json.loads((BUNDLED_MODELS_DIR / "lookalike-mini" / "magento_split.json").read_text())
    rows, _ = _load_script("prepare_magento").build_manifest(datasets_dir / "magento")
    result = eval_magento(mini, rows, set(split["held_out"]), limit=240)
    # The 0.95 near-duplicate target is missed (0.785 on the whole catalogue, see MODEL_CARD.md);
    # these floors sit just under what the model measures, to catch regressions.
    assert result["all"]["near_dup_recall_at_1"] >= 0.72, result
    assert result["all"]["same_product_recall_at_5"] >= 0.65, result
    assert result["all"]["category_accuracy"] >= 0.75, result
    random_tiny = eval_magento(load_model("test-tiny", None, "cpu"), rows, set(split["held_out"]), limit=240)
    assert result["all"]["category_accuracy"] > random_tiny["all"]["category_accuracy"] + 0.4
