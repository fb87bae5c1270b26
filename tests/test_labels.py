"""Label sets, prompt ensembles and zero-shot scoring."""
import copy
import json

import numpy as np
import pytest

from indexer.labels import DEFAULT_LABELS_FILE, LabelSet, LabelSetError, ZeroShotClassifier

pytestmark = pytest.mark.integration


def test_default_retail_taxonomy_loads():
    ls = LabelSet.load()
    names = ls.names
    for expected in ("t-shirt", "hoodie", "jacket", "trousers", "shorts", "dress", "skirt", "shoes", "boots",
                     "sandals", "bag", "backpack", "watch", "jewellery", "sports equipment", "electronics", "furniture"):
        assert expected in names
    assert len(ls.templates) >= 4 and all("{}" in t for t in ls.templates)
    assert DEFAULT_LABELS_FILE.name == "retail.yaml"


def test_json_and_bare_names(tmp_path):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"labels": ["cat", {"name": "dog", "prompts": ["dog", "puppy"]}]}))
    ls = LabelSet.load(p)
    assert ls.names == ["cat", "dog"]
    assert ls.labels[1].prompts == ("dog", "puppy")
    assert ls.labels[0].prompts == ("cat",)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"labels": ["only-one"]}, "at least 2"),
        ({"labels": ["a", "a"]}, "twice"),
        ({"labels": ["a", 3]}, "string or"),
        ({"labels": ["a", "b"], "templates": ["no placeholder"]}, "'{}'"),
        ({"nolabels": []}, "'labels' list"),
        ({"labels": ["a", {"name": "b", "prompts": [""]}]}, "non-empty"),
        ({"labels": ["a", "b"], "templates": ["a photo of {} {x}"]}, "no other braces"),
        ({"labels": ["a", "b"], "templates": ["{} {}"]}, "no other braces"),
    ],
)
def test_bad_label_sets_are_refused_clearly(data, fragment):
    with pytest.raises(LabelSetError) as e:
        LabelSet.from_dict(data)
    assert fragment in str(e.value)


def test_unreadable_label_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("labels: [a, b\n")
    with pytest.raises(LabelSetError, match="not valid YAML"):
        LabelSet.load(p)
    with pytest.raises(LabelSetError, match="cannot read"):
        LabelSet.load(tmp_path / "missing.yaml")


def test_probabilities_sum_to_one_and_follow_cosine(tiny_model):
    clf = ZeroShotClassifier(tiny_model, LabelSet.from_names(["hoodie", "dress", "watch"]))
    assert clf.weights.shape == (3, tiny_model.dim)
    np.testing.assert_allclose(np.linalg.norm(clf.weights, axis=1), 1, atol=1e-5)
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(5, tiny_model.dim)).astype(np.float32)
    imgs /= np.linalg.norm(imgs, axis=1, keepdims=True)
    probs, cos = clf.scores(imgs)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(cos, imgs @ clf.weights.T, atol=1e-6)
    # the label whose embedding the image *is* wins, with the highest cosine
    top = clf.top_k(clf.weights[1:2], 3)[0]
    assert top[0]["label"] == "dress"
    assert top[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)


def test_prompt_ensemble_is_mean_of_template_embeddings_and_a_label_scores_its_best_prompt(tiny_model):
    ls = LabelSet.from_dict({"labels": [{"name": "bag", "prompts": ["bag", "tote"]}, "shoe"],
                             "templates": ["a photo of a {}.", "a {} for sale."]})
    clf = ZeroShotClassifier(tiny_model, ls)
    assert clf.weights.shape == (3, tiny_model.dim)  # one row per prompt: bag, tote, shoe
    assert clf.prompt_label.tolist() == [0, 0, 1]
    for row, texts in ((0, ["a photo of a bag.", "a bag for sale."]), (1, ["a photo of a tote.", "a tote for sale."])):
        mean = tiny_model.embed_texts(texts).mean(axis=0)
        np.testing.assert_allclose(clf.weights[row], mean / np.linalg.norm(mean), atol=1e-5)
    rng = np.random.default_rng(1)
    imgs = rng.normal(size=(6, tiny_model.dim)).astype(np.float32)
    imgs /= np.linalg.norm(imgs, axis=1, keepdims=True)
    cos = imgs @ clf.weights.T
    np.testing.assert_allclose(clf.cosines(imgs), np.stack([cos[:, :2].max(1), cos[:, 2]], 1), atol=1e-6)
    np.testing.assert_allclose(clf.best_cosines(imgs), cos.max(1), atol=1e-6)
    # a photo that is exactly the "tote" prompt is a bag, with cosine 1
    top = clf.top_k(clf.weights[1:2], 2)[0]
    assert top[0]["label"] == "bag" and top[0]["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_mean_pooling_averages_a_labels_prompts(tiny_model):
    ls = LabelSet.from_dict({"labels": [{"name": "bag", "prompts": ["bag", "tote"]}, "shoe"], "pooling": "mean"})
    assert ls.to_dict()["pooling"] == "mean" and LabelSet.from_dict(ls.to_dict()) == ls
    clf = ZeroShotClassifier(tiny_model, ls)
    mean = clf.weights[0] + clf.weights[1]
    mean /= np.linalg.norm(mean)
    img = clf.weights[2:3]
    np.testing.assert_allclose(clf.cosines(img), [[float(img[0] @ mean), 1.0]], atol=1e-5)
    with pytest.raises(LabelSetError, match="'pooling' must be one of max, mean"):
        LabelSet.from_dict({"labels": ["a", "b"], "pooling": "median"})


def test_label_embeddings_are_cached_on_disk_by_model_and_prompts(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    ls = LabelSet.from_dict({"labels": ["hoodie", "watch", "yoga mat"]}, cache_on_disk=True)
    first = ZeroShotClassifier(tiny_model, ls)
    assert len(list((tmp_path / "labels").glob("*.npy"))) == 1

    def no_text_tower(texts):
        raise AssertionError("the cached label embeddings should have been used")

    monkeypatch.setattr(tiny_model, "embed_texts", no_text_tower)
    np.testing.assert_array_equal(ZeroShotClassifier(tiny_model, ls).weights, first.weights)
    other = LabelSet.from_dict({"labels": ["hoodie", "watch", "backpack"]}, cache_on_disk=True)
    with pytest.raises(AssertionError, match="cached label embeddings"):
        ZeroShotClassifier(tiny_model, other)  # other prompts: not a cache hit
    monkeypatch.undo()
    next((tmp_path / "labels").glob("*.npy")).write_bytes(b"damaged")
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    np.testing.assert_allclose(ZeroShotClassifier(tiny_model, ls).weights, first.weights, atol=1e-6)


def test_label_sets_from_requests_leave_no_file(tiny_model, tmp_path, monkeypatch):
    """Only label-set files are cached on disk: a file per label set a client sends would fill the disk."""
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path))
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"labels": ["hoodie", "watch"]}))
    assert LabelSet.load(path).cache_on_disk
    ZeroShotClassifier(tiny_model, LabelSet.load(path))
    assert len(list((tmp_path / "labels").glob("*.npy"))) == 1
    for i in range(5):
        ZeroShotClassifier(tiny_model, LabelSet.from_names([f"label {i}", "other"]))
    assert len(list((tmp_path / "labels").glob("*.npy"))) == 1


def test_tokenizer_word_cache_is_bounded(tiny_model):
    from indexer.cache import bound_tokenizer_cache

    tokenizer = copy.copy(tiny_model.tokenizer)
    assert isinstance(tokenizer.cache, dict), "test-tiny uses open_clip's SimpleTokenizer, which has a word cache"
    tokenizer.cache = dict(tokenizer.cache)  # unbounded, as open_clip builds it
    start = len(tokenizer.cache)
    bound_tokenizer_cache(tokenizer, max_words=start + 10)
    tokenizer([" ".join(f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}q" for i in range(200))])
    assert len(tokenizer.cache) == start + 10
    assert tokenizer(["a photo of a hoodie"]).shape[0] == 1


def test_a_reference_ranks_each_label_against_the_photos_it_fits_best(tiny_model, fixture_catalogue):
    """set_reference: each label's term is the mean of its k best cosines (its best prompt's) over the
    reference photos (k = min(10, n // 10)), subtracted from its cosines; cosines, the reject option
    and the plain ranking are untouched; too small a reference turns the correction off."""
    from indexer.images import open_image
    from indexer.labels import MIN_REFERENCE

    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    photos = sorted({r["image"] for r in rows})
    vecs = tiny_model.embed_images([open_image(p) for p in photos])
    extra = np.random.default_rng(0).normal(size=(150, vecs.shape[1])).astype(np.float32)
    # the catalogue's distinct photos, then random unit vectors up to 150 distinct rows
    reference = np.concatenate([np.unique(vecs, axis=0), extra / np.linalg.norm(extra, axis=1, keepdims=True)])[:150]
    ls = LabelSet.from_dict({"labels": [{"name": "bag", "prompts": ["bag", "tote"]}, "shoe", "hoodie"]})
    clf = ZeroShotClassifier(tiny_model, ls)
    plain_probs, plain_cos = clf.scores(vecs)
    assert not clf.set_reference(reference[: MIN_REFERENCE - 1]) and clf.reference_term is None
    assert clf.set_reference(reference) and clf.reference_size == 150
    k = 10  # min(HUBNESS_K, 150 // 10)
    # the term is each label's (its best prompt's cosine), not each prompt's
    term = np.sort(clf.cosines(reference), axis=0)[-k:].mean(axis=0)
    assert term.shape == (3,)
    np.testing.assert_allclose(clf.reference_term, term, atol=1e-5)
    expected = plain_cos - term
    np.testing.assert_allclose(clf.label_scores(vecs), expected, atol=1e-5)
    probs, cos = clf.scores(vecs)
    logits = tiny_model.logit_scale * expected
    soft = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, soft / soft.sum(1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(cos, plain_cos, atol=1e-6)  # the cosines stay plain
    assert not np.allclose(probs, plain_probs, atol=1e-3)
    clf.set_reference(None)
    np.testing.assert_allclose(clf.scores(vecs)[0], plain_probs, atol=1e-6)


def test_closed_set_on_too_few_photos_says_so_and_labels_by_plain_cosine(index_copy, tmp_path, capsys):
    """The fixture index holds fewer photos than the correction needs: the CLI says so on stderr and
    writes the same labels as without --closed-set."""
    from indexer.cli import main

    reports = []
    for flag in ((), ("--closed-set",)):
        out = tmp_path / f"labels{len(flag)}.jsonl"
        assert main(["label", str(index_copy), "--report", str(out), *flag]) == 0
        reports.append([json.loads(x) for x in out.read_text().splitlines()])
    err = capsys.readouterr().err
    assert "--closed-set:" in err and "fewer than the 100 it needs" in err
    assert reports[0] == reports[1] and len(reports[0]) > 10


def test_a_reference_leaves_out_damaged_and_repeated_rows_and_refuses_a_wrong_shape(tiny_model, fixture_catalogue):
    """A NaN, infinite or zero row (a damaged stored vector) and repeats of one photo do not reach the
    term: the correction is the one of the clean, distinct rows, or off when fewer than 100 remain."""
    from indexer.images import open_image

    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    photos = sorted({r["image"] for r in rows})
    vecs = np.unique(tiny_model.embed_images([open_image(p) for p in photos]), axis=0)
    rng = np.random.default_rng(0)
    extra = rng.normal(size=(150 - len(vecs), vecs.shape[1])).astype(np.float32)
    clean = np.concatenate([vecs, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    clf = ZeroShotClassifier(tiny_model, LabelSet.from_names(["bag", "shoe", "hoodie"]))
    assert clf.set_reference(clean) and clf.reference_size == 150
    term = clf.reference_term.copy()
    bad = np.zeros((3, vecs.shape[1]), np.float32)
    bad[0, 0], bad[1, 1] = np.nan, np.inf
    assert clf.set_reference(np.concatenate([clean, bad, clean[:40]]))
    assert clf.reference_size == 150 and np.isfinite(clf.reference_term).all()
    np.testing.assert_allclose(clf.reference_term, term, atol=1e-6)
    assert not clf.set_reference(np.repeat(vecs[:1], 300, axis=0)) and clf.reference_size == 1
    assert clf.reference_term is None
    with pytest.raises(ValueError, match=r"reference photos must be an \(n, \d+\) array"):
        clf.set_reference(clean[:, : vecs.shape[1] // 2])
    with pytest.raises(ValueError, match="reference photos must be"):
        clf.set_reference(clean.reshape(-1))
