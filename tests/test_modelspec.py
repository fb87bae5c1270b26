"""The model specification: the rule that picks an index's model, and the option lists the CLI and the
server settings share (indexer.modelspec)."""
from __future__ import annotations

from pathlib import Path

import pytest

from indexer import modelspec as ms
from indexer.records import ModelIdentity

pytestmark = pytest.mark.integration

INDEX = ModelIdentity(name="ViT-B-16", pretrained="openai", weights_sha256="ab" * 32, dim=512, image_size=224)


def test_the_index_model_is_used_unless_another_is_named():
    assert ms.ModelSpec().for_index(INDEX) == ("ViT-B-16", "openai")
    assert ms.ModelSpec(pretrained="/w/vit.pt").for_index(INDEX) == ("ViT-B-16", "/w/vit.pt")
    # naming the index's own model keeps its weights
    assert ms.ModelSpec(name="ViT-B-16").for_index(INDEX) == ("ViT-B-16", "openai")
    # another model comes with the weights named for it, none otherwise (load_for checks them)
    assert ms.ModelSpec(name="hf-hub:org/vit").for_index(INDEX) == ("hf-hub:org/vit", None)
    assert ms.ModelSpec(name="ViT-B-32", pretrained="x.pt").for_index(INDEX) == ("ViT-B-32", "x.pt")


def test_a_new_index_gets_the_default_model_and_its_weights():
    assert ms.ModelSpec().for_new_index() == (ms.DEFAULT_MODEL, ms.DEFAULT_PRETRAINED)
    assert ms.ModelSpec(pretrained="w.pt").for_new_index() == (ms.DEFAULT_MODEL, "w.pt")
    assert ms.ModelSpec(name="test-tiny").for_new_index() == ("test-tiny", None)


def test_a_model_with_other_weights_is_a_clear_error(tmp_path, tiny_model):
    from indexer.records import ModelMismatch
    from indexer.store import Store

    other = ModelIdentity("test-tiny", None, "0" * 64, tiny_model.dim, tiny_model.identity.image_size)
    with Store.create(tmp_path / "idx", other) as store:
        store.save()
    with Store.open(tmp_path / "idx") as store, pytest.raises(ModelMismatch, match="was built with model test-tiny"):
        ms.ModelSpec(device="cpu", backend="torch").load_for(store)


def test_local_dir_is_parsed_in_one_place(tmp_path):
    assert ms.local_dir(f"local-dir:{tmp_path}") == Path(tmp_path)
    assert ms.local_dir("hf-hub:org/repo") is None and ms.local_dir("ViT-B-32") is None
    ident, extra = ms.open_clip_name("test-tiny")
    assert ms.local_dir(ident) == ms.BUNDLED_MODELS_DIR / "test-tiny"
    assert ms.open_clip_name("ViT-B-32") == ("ViT-B-32", {})
    with pytest.raises(ms.ModelLoadError, match="no open_clip_config.json"):
        ms.open_clip_name(str(tmp_path))


def test_cli_and_server_settings_share_the_option_lists():
    from indexer.cli import build_parser
    from server.settings import ServerSettings

    serve = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices["serve"]
    options = {a.dest: a for a in serve._actions}
    for field, choices, help_text in (("precision", ms.PRECISIONS, ms.PRECISION_HELP),
                                      ("backend", ms.BACKENDS, ms.BACKEND_HELP)):
        assert tuple(options[field].choices) == choices and options[field].help == help_text
        info = ServerSettings.model_fields[field]
        assert info.description == help_text
        for value in choices:
            assert getattr(ServerSettings(**{field: value}), field) == value
        with pytest.raises(ValueError):
            ServerSettings(**{field: "nonsense"})
    spec = ServerSettings(model="m", pretrained="p", precision="bf16", backend="torch", device="cpu").model_spec()
    assert spec == ms.ModelSpec("m", "p", "bf16", "torch", "cpu")
