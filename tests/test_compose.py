"""Composed queries ("like this, but in red") and region search ("find the bag in this photo"):
the library's combination and boxes (unit), and, on a few real Magento products indexed with the
bundled lookalike-base, the library, the real server (with hostile values), the CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import served
from PIL import Image

from indexer.compose import (
    DEFAULT_TEXT_WEIGHT,
    MAX_QUERY_TEXT_CHARS,
    MIN_BOX_SIDE,
    QueryError,
    compose,
    composer,
    crop_box,
    parse_box,
)
from indexer.images import image_from_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_region  # noqa: E402

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------ the combination
@pytest.mark.unit
def test_weight_0_is_the_photo_alone_and_weight_1_the_text_alone():
    rng = np.random.default_rng(0)
    photos, text, negative = _unit(rng.normal(size=(3, 16))), _unit(rng.normal(size=(1, 16))), \
        _unit(rng.normal(size=(1, 16)))
    np.testing.assert_allclose(compose(photos, text, negative, 0.0), photos, atol=1e-6)
    np.testing.assert_allclose(compose(photos, text, None, 1.0), np.repeat(text, 3, axis=0), atol=1e-6)
    mixed = compose(photos, text, negative, DEFAULT_TEXT_WEIGHT)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-6)
    assert mixed.dtype == np.float32 and mixed.shape == (3, 16)


@pytest.mark.unit
def test_the_photo_only_dimensions_leave_a_composed_query_but_not_a_photo_search():
    """With a text, the dimensions no text uses are zeroed in the photo (and the photo renormalised)
    before the weighted sum; without one, nothing changes."""
    rng = np.random.default_rng(2)
    photos, text = _unit(rng.normal(size=(3, 16))), _unit(rng.normal(size=(1, 16)))
    text[:, 12:] = 0
    text = _unit(text)
    only = slice(12, 16)
    mixed = compose(photos, text, None, 0.7, only)
    learned = photos.copy()
    learned[:, only] = 0
    np.testing.assert_allclose(mixed, compose(_unit(learned), text, None, 0.7), atol=1e-6)
    assert np.abs(mixed[:, only]).max() == 0
    np.testing.assert_allclose(compose(photos, None, None, 0.7, only), photos, atol=1e-6)
    only_signature = np.zeros((1, 16), np.float32)
    only_signature[0, 14] = 1  # a photo that is nothing but its photo-only part keeps it
    np.testing.assert_allclose(compose(only_signature, text, None, 0.7, only), compose(only_signature, text, None, 0.7))


@pytest.mark.unit
def test_negative_text_moves_the_ranking_away_from_it():
    """A catalogue of vectors: the photo's nearest neighbour is the one nearest the negative words too;
    with the negative words subtracted it drops, and every vector's score moves against its cosine
    with the negative."""
    rng = np.random.default_rng(1)
    photo, negative = _unit(rng.normal(size=(1, 32))), rng.normal(size=(1, 32))
    negative = _unit(negative - (negative @ photo.T) * photo)  # orthogonal to the photo
    catalogue = _unit(np.concatenate([photo + 0.3 * negative, photo - 0.35 * negative, rng.normal(size=(20, 32))]))
    plain = catalogue @ compose(photo, None, None, 0.5)[0]
    away = catalogue @ compose(photo, None, negative, 0.5)[0]
    assert np.argmax(plain) == 0 and np.argmax(away) == 1
    towards_negative = catalogue @ negative[0]
    assert np.corrcoef(away - plain, towards_negative)[0, 1] < -0.5


@pytest.mark.unit
@pytest.mark.parametrize("weight", [-0.01, 1.01, float("nan"), float("inf"), "heavy"])
def test_a_weight_outside_0_1_is_refused(weight):
    with pytest.raises(QueryError, match="text_weight"):
        compose(np.ones((1, 4), np.float32) / 2, None, None, weight)


# ------------------------------------------------------------------ boxes
@pytest.mark.unit
def test_boxes_in_fractions_and_pixels():
    assert parse_box("0.25,0.5,0.75,1").fractions
    assert parse_box("0,0,1,1").pixels(400, 300) == (0, 0, 400, 300)
    pixels = parse_box("10,20,110,220")
    assert not pixels.fractions and pixels.pixels(400, 300) == (10, 20, 110, 220)


@pytest.mark.unit
@pytest.mark.parametrize("value, words", [
    ("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("nan,0,10,10", "finite"),
    ("0,0,inf,10", "finite"), ("-5,0,10,10", "negative"), ("50,0,10,10", "x0 < x1"), ("0,0,0.5,0", "x0 < x1"),
    ("1" * 300, "at most"),
])
def test_bad_boxes_are_refused_with_a_clear_message(value, words):
    with pytest.raises(QueryError, match=words):
        parse_box(value)


@pytest.mark.unit
def test_a_box_past_the_photo_or_under_the_minimum_is_refused():
    im = image_from_bytes(_jpeg(Image.new("RGB", (200, 100), "white")))
    with pytest.raises(QueryError, match="reaches past the photo, which is 200x100"):
        crop_box(im, parse_box("100,0,201,100"))
    with pytest.raises(QueryError, match="too small"):
        crop_box(im, parse_box(f"0,0,{MIN_BOX_SIDE - 1},50"))
    assert crop_box(im, parse_box(f"0,0,{MIN_BOX_SIDE},{MIN_BOX_SIDE}")).size == (MIN_BOX_SIDE, MIN_BOX_SIDE)


@pytest.mark.unit
def test_a_box_is_measured_on_the_upright_photo_and_mapped_onto_a_draft_decode():
    """A 1600x800 photo stored sideways (EXIF orientation 6) with its upright left half red and right half
    blue, decoded at a draft scale: the boxes of the upright halves (in pixels and in fractions) hold the
    right colours."""
    upright = Image.new("RGB", (1600, 800), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 800, 800))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    im = image_from_bytes(_jpeg(stored, exif=exif), draft_size=224)
    assert im.info["original_size"] == (1600, 800) and im.size[0] < 1600  # upright, draft-reduced
    for box, colour in (("0,0,800,800", (255, 0, 0)), ("0.5,0,1,1", (0, 0, 255)), ("100,100,700,700", (255, 0, 0))):
        mean = np.asarray(crop_box(im, parse_box(box))).reshape(-1, 3).mean(0)
        assert np.abs(mean - colour).max() < 40, (box, mean)


# ------------------------------------------------------------------ real photos, lookalike-base
@pytest.fixture(scope="module")
def base():
    from indexer.model import load_model

    return load_model("lookalike-base", None, "cpu", backend="torch")


@pytest.fixture(scope="module")
def magento_small(base, datasets_dir, tmp_path_factory):
    """Eight Magento hoodies and tees in several colours and four bags, every photo, indexed with
    lookalike-base. Returns (index path, manifest rows)."""
    from indexer.catalogue import read_catalogue
    from indexer.magento import build_manifest
    from indexer.pipeline import index_catalogue
    from indexer.store import Store

    rows, _ = build_manifest(datasets_dir / "magento")
    coloured = sorted({r["id"] for r in rows if r["color"]})
    multi = [p for p in coloured if len({r["color"] for r in rows if r["id"] == p}) >= 3][:8]
    bags = sorted({r["id"] for r in rows if r["category"] == "Gear/Bags"})[:4]
    keep = [r for r in rows if r["id"] in set(multi + bags)]
    tmp = tmp_path_factory.mktemp("compose")
    manifest = tmp / "magento-small.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in keep))
    out = tmp / "index"
    with Store.create(out, base.identity) as store:
        index_catalogue(read_catalogue(manifest), store, base, workers=0, progress=False)
    return out, keep


def _colour_queries(rows):
    """(product, photo path of colour A (main view), colour B) for every ordered pair of its colours."""
    by_product: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["color"] and (r["view"] == "main" or r["color"] not in by_product.get(r["id"], {})):
            by_product.setdefault(r["id"], {})[r["color"]] = r["image"]
    return [(p, photos[a], b) for p, photos in by_product.items() for a in photos for b in photos if a != b]


@pytest.mark.integration
def test_photo_plus_a_colour_finds_the_product_in_that_colour(base, magento_small):
    """The photo alone matches the product by the query photo itself (its colour); with the words of
    another colour, the product's photo in that colour is what matches, for most pairs."""
    from indexer.pipeline import embed_paths
    from indexer.store import Store

    index, rows = magento_small
    colour_of = {r["image"]: r["color"] for r in rows}
    queries = _colour_queries(rows)
    assert len(queries) >= 20
    found = {"photo": 0, "composed": 0}
    with Store.open(index) as store:
        for product, path, colour in queries:
            _, photo, _ = embed_paths(base, [path])
            for name, query in (("photo", None), ("composed", composer(base, f"in {colour.lower()}", None))):
                hits = store.search(photo if query is None else query(photo), 5, min_score=0.0)[0]
                found[name] += any(h.product_id == product and colour_of[h.source] == colour for h in hits)
    assert found["photo"] == 0
    assert found["composed"] >= 0.6 * len(queries), found


@pytest.mark.integration
def test_lookalike_bases_luma_signature_is_photo_only_and_stays_out_of_composed_queries(base, magento_small):
    """lookalike-base's luma signature sits in dimensions where every text embedding is zero; a composed
    query that kept it would stay pinned to the query photo's own colours (fewer colour queries found)."""
    from indexer.pipeline import embed_paths
    from indexer.store import Store

    only = base.photo_only_dims
    assert only is not None and only.stop == base.dim
    texts = base.embed_texts(["in red", "a black bag", "hoodie"])
    assert np.abs(texts[:, only]).max() == 0
    index, rows = magento_small
    colour_of = {r["image"]: r["color"] for r in rows}
    found = {"without": 0, "with": 0}
    with Store.open(index) as store:
        for product, path, colour in _colour_queries(rows):
            _, photo, _ = embed_paths(base, [path])
            assert np.linalg.norm(photo[0, only]) > 0.3  # the photo does carry it
            text = base.embed_texts([f"in {colour.lower()}"])
            for name, dims in (("without", only), ("with", None)):
                hits = store.search(compose(photo, text, None, DEFAULT_TEXT_WEIGHT, dims), 5, min_score=0.0)[0]
                found[name] += any(h.product_id == product and colour_of[h.source] == colour for h in hits)
    assert found["without"] > found["with"], found


@pytest.mark.integration
def test_words_the_model_does_not_know_are_refused(base):
    with pytest.raises(QueryError, match="no word the model knows"):
        composer(base, "zzqxv qqwrtz", None)
    with pytest.raises(QueryError, match="negative_text is empty"):
        composer(base, "in red", "   ")
    with pytest.raises(QueryError, match=f"at most {MAX_QUERY_TEXT_CHARS}"):
        composer(base, "red " * 400, None)
    assert composer(base, None, None) is None
    with pytest.raises(QueryError, match="text_weight weighs text"):
        composer(base, None, None, 0.5)  # a weight with nothing to weigh is a mistake, not a photo search


def _canvas(rows, seed: int):
    """A seeded scene-like canvas (scripts/eval_region.py) with one bag's photo pasted among five
    other products' photos: (JPEG bytes, the bag's product id, its box)."""
    rng = np.random.default_rng(seed)
    firsts = {}
    for r in rows:
        firsts.setdefault(r["id"], r)
    bag = [r for r in firsts.values() if r["category"] == "Gear/Bags"][seed % 4]
    others = [r for r in firsts.values() if r["id"] != bag["id"]][:5]
    canvas, box = eval_region.make_canvas(Image.open(bag["image"]).convert("RGB"),
                                          [Image.open(r["image"]).convert("RGB") for r in others], rng)
    return _jpeg(canvas), bag["id"], box


@pytest.fixture(scope="module")
def server(magento_small, tmp_path_factory):
    env = {"LOOKALIKE_BACKEND": "torch", "LOOKALIKE_ACCESS_LOG": "false", "LOOKALIKE_MAX_PIXELS": "4000000",
           "LOOKALIKE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with served(magento_small[0], env) as url:
        yield url


def _search(url, data: bytes, **form):
    return httpx.post(f"{url}/v1/search/image", params={"k": 5, "labels": "false"},
                      files={"image": ("q.jpg", data, "image/jpeg")}, data=form, timeout=120)


@pytest.mark.system
def test_the_server_finds_the_pasted_bag_by_its_box(server, magento_small):
    for seed in range(3):
        data, product, (x0, y0, x1, y1) = _canvas(magento_small[1], seed)
        by_pixels = _search(server, data, box=f"{x0},{y0},{x1},{y1}")
        assert by_pixels.status_code == 200, by_pixels.text
        ids = [r["id"] for r in by_pixels.json()["results"]]
        assert product in ids, (seed, ids)
        w, h = eval_region.CANVAS_SIZE
        by_fractions = _search(server, data, box=f"{x0 / w},{y0 / h},{x1 / w},{y1 / h}")
        assert [r["id"] for r in by_fractions.json()["results"]][:1] == ids[:1]


@pytest.mark.system
def test_the_server_composes_a_photo_with_words(server, magento_small):
    """The photo alone matches its product by its own colour; with the words of another colour the
    product's photo in that colour matches (``image_metadata`` holds the catalogue's colour column)."""
    product, path, colour = _colour_queries(magento_small[1])[0]
    data = Path(path).read_bytes()
    plain = _search(server, data).json()
    refined = _search(server, data, text=f"in {colour.lower()}", text_weight="0.7")
    assert refined.status_code == 200, refined.text
    body = refined.json()
    assert body["close_match"] is None and plain["close_match"] is not None
    top = plain["results"][0]
    assert top["id"] == product and top["image_metadata"]["color"] != colour
    matched = [r["image_metadata"]["color"] for r in body["results"] if r["id"] == product]
    assert matched == [colour], (colour, body["results"])
    similar = httpx.get(f"{server}/v1/products/{product}/similar",
                        params={"k": 5, "text": f"in {colour.lower()}", "negative_text": "black"}, timeout=60)
    assert similar.status_code == 200, similar.text
    assert product not in [r["id"] for r in similar.json()["results"]]


HOSTILE_FORMS = [
    ({"text": "\t \n"}, "text is empty"), ({"text": "   "}, "text is empty"),
    ({"text": "x" * (MAX_QUERY_TEXT_CHARS + 1)}, "text"),
    ({"text": "zzqxv qqwrtz"}, "no word the model knows"), ({"negative_text": "zzqxv"}, "no word the model knows"),
    ({"text": "red", "text_weight": "1.5"}, "text_weight"), ({"text": "red", "text_weight": "-0.1"}, "text_weight"),
    ({"text": "red", "text_weight": "nan"}, "text_weight"), ({"text": "red", "text_weight": "heavy"}, "text_weight"),
    ({"text_weight": "0.5"}, "text_weight weighs text"),
    ({"box": "nan,0,100,100"}, "finite"), ({"box": "300,0,100,100"}, "x0 < x1"), ({"box": "0,0,0.5"}, "four numbers"),
    ({"box": "0,0,5000,100"}, "reaches past the photo"), ({"box": "10,10,13,13"}, "too small"),
    ({"box": "-1,0,100,100"}, "negative"), ({"box": "0,0,1,1" * 100}, "box"),
]


@pytest.mark.system
@pytest.mark.parametrize("form, words", HOSTILE_FORMS)
def test_the_server_refuses_bad_text_weights_and_boxes_with_a_json_422(server, magento_small, form, words):
    data = Path(_colour_queries(magento_small[1])[0][1]).read_bytes()
    r = _search(server, data, **form)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] in ("bad_query", "validation_error") and words in error["message"], error


@pytest.mark.system
@pytest.mark.parametrize("params, words", [({"text": "zzqxv"}, "no word the model knows"),
                                           ({"text": ""}, "text is empty"),
                                           ({"text": "red", "text_weight": "2"}, "text_weight"),
                                           ({"text_weight": "0.5"}, "text_weight weighs text"),
                                           ({"negative_text": " "}, "negative_text is empty")])
def test_similar_refuses_bad_words_and_weights(server, magento_small, params, words):
    product = _colour_queries(magento_small[1])[0][0]
    r = httpx.get(f"{server}/v1/products/{product}/similar", params=params, timeout=60)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


@pytest.mark.system
def test_the_decode_limits_apply_to_the_whole_photo_before_the_box(server):
    """The server runs with max_pixels 4,000,000: a 2500x2000 PNG is refused whatever box is asked for."""
    buf = io.BytesIO()
    Image.new("RGB", (2500, 2000), "white").save(buf, "PNG")
    r = _search(server, buf.getvalue(), box="0,0,100,100")
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text


@pytest.mark.system
def test_openapi_documents_the_fields(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    form_ref = spec["paths"]["/v1/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][form_ref["$ref"].rsplit("/", 1)[1]]["properties"]
    for field in ("text", "text_weight", "negative_text", "box"):
        assert form[field]["description"], field
    assert form["text_weight"].get("default") is None  # not given: the default weight, if there are words to weigh
    assert f"Default {DEFAULT_TEXT_WEIGHT}" in form["text_weight"]["description"]
    assert "fractions" in form["box"]["description"] and "EXIF" in form["box"]["description"]
    similar = {p["name"] for p in spec["paths"]["/v1/products/{product_id}/similar"]["get"]["parameters"]}
    assert {"text", "text_weight", "negative_text"} <= similar


def _cli(*args):
    return subprocess.run([LOOKALIKE, "search", *map(str, args), "--backend", "torch"], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.system
def test_the_cli_takes_text_weights_negative_words_and_boxes(magento_small, tmp_path):
    index, rows = magento_small
    product, path, colour = _colour_queries(rows)[0]
    own = next(r["color"] for r in rows if r["image"] == path)  # the photo's colour: the words to move away from
    runs = {}
    for extra in ([], ["--negative-text", own.lower()]):
        done = _cli(index, "--image", path, "--text", f"in {colour.lower()}", "--text-weight", "0.7", *extra,
                    "-k", "5", "--json")
        assert done.returncode == 0, done.stderr
        runs[bool(extra)] = json.loads(done.stdout)["results"]
    assert [r["image_metadata"]["color"] for r in runs[False] if r["id"] == product] == [colour]
    scores = lambda results: [(r["id"], r["photo_id"], r["score"]) for r in results]  # noqa: E731
    assert scores(runs[True]) != scores(runs[False])  # the negative words took part
    data, bag, (x0, y0, x1, y1) = _canvas(rows, 0)
    (tmp_path / "scene.jpg").write_bytes(data)
    done = _cli(index, "--image", tmp_path / "scene.jpg", "--box", f"{x0},{y0},{x1},{y1}", "-k", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert bag in [r["id"] for r in json.loads(done.stdout)["results"]]


@pytest.mark.system
@pytest.mark.parametrize("args, words", [
    (["--box", "50,50,10,10"], "x0 < x1"), (["--box", "0,0,99999,10"], "reaches past the photo"),
    (["--text", "red", "--text-weight", "2"], "text_weight"), (["--text", "zzqxv"], "no word the model knows"),
    (["--text", " "], "text is empty"), (["--text-weight", "0.5"], "text_weight weighs text"),
])
def test_the_cli_refuses_bad_values_with_one_line(magento_small, args, words):
    index, rows = magento_small
    done = _cli(index, "--image", rows[0]["image"], *args)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.system
def test_the_cli_needs_a_photo_for_a_box(magento_small):
    done = _cli(magento_small[0], "--text", "bag", "--box", "0,0,0.5,0.5")
    assert done.returncode == 2 and "give --image too" in done.stderr, done.stderr
