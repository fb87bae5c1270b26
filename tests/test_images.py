"""Tests for indexer.images against the real awkward files in shared/datasets/messy-images.

Every file in that folder has an exact expected outcome below: either the
``(width, height)`` of the RGB image ``open_image`` returns, or the
``ImageError.reason`` it raises (these tests are marked ``datasets``).  The
orientation, size-guard and source tests use the generated 128x128 test card of
tests/fixtures/make_catalogue.py in several formats and EXIF orientations; the
remaining tests build their inputs in memory (big JPEGs, odd pixel modes,
animations) to check behaviour the folder does not pin down.
"""
from __future__ import annotations

import gc
import hashlib
import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from indexer import images
from indexer.images import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageError,
    file_sha256,
    image_from_bytes,
    open_image,
)

# name -> (width, height) it opens as, or the ImageError reason it raises.
# Sizes are after EXIF orientation (orientation_rectangle.jpg is stored 2x1).
EXPECTED: dict[str, tuple[int, int] | str] = {
    "00r1_graya_la.jp2": "corrupt",  # Pillow fuzz file: "broken data stream"
    "16bit.cropped.tif": (64, 64),
    "LICENSE_Pillow.txt": "not_an_image",
    "anim_frame1.webp": (82, 82),
    "broken.png": "corrupt",  # PNG signature, garbage chunks
    "broken_data_stream.png": "corrupt",  # valid header, bad zlib stream
    "broken_exif_dpi.jpg": (100, 100),
    "decompression_bomb.gif": "decompression_bomb",
    "decompression_bomb_extents.gif": (100, 100),  # the bomb is frame 1; we use frame 0
    "exif-dpi-zerodivision.jpg": (200, 200),
    "flower.webp": (480, 360),
    "hopper.bmp": (128, 128),
    "hopper.gif": (128, 128),
    "hopper.ico": (16, 16),
    "hopper.jpg": (128, 128),
    "hopper.png": (128, 128),
    "hopper.tif": (128, 128),
    "hopper.webp": (128, 128),
    "hopper_1bit.pbm": (128, 128),
    "hopper_orientation_3.jpg": (128, 128),
    "hopper_orientation_6.jpg": (128, 128),
    "hopper_orientation_6.webp": (128, 128),
    "hopper_orientation_8.jpg": (128, 128),
    "hopper_rle8_grayscale.bmp": (256, 10),
    "icc_profile_big.jpg": (425, 250),
    "iss634.apng": (245, 245),
    "iss634.gif": (245, 245),
    "iss634.webp": (245, 245),
    "l_trns.png": (64, 64),
    "no_palette_with_transparency.gif": (2, 2),
    "orientation_rectangle.jpg": (1, 2),
    "pil123rgba.png": (162, 150),
    "pil_sample_cmyk.jpg": (100, 100),
    "rgba.psd": (100, 100),
    "tiff_16bit_RGBa.tiff": (100, 40),
    "tiff_strip_cmyk_jpeg.tif": (100, 100),
    "truncated_image.png": "truncated",
    "truncated_jpeg.jpg": "truncated",
    "zero_width.gif": "zero_size",
}

# A fragment of Pillow's own message that must survive into str(ImageError).
PILLOW_MESSAGE = {
    "00r1_graya_la.jp2": "broken data stream",
    "broken.png": "broken PNG file",
    "broken_data_stream.png": "unrecognized data stream contents",
    "decompression_bomb.gif": "decompression bomb",
    "truncated_image.png": "image file is truncated",
    "truncated_jpeg.jpg": "image file is truncated",
}


pytestmark = pytest.mark.unit


@pytest.fixture(scope="session")
def card(fixture_data) -> Path:
    """The generated test card folder: card.jpg (128x128, upright), the same in other formats and
    stored turned with EXIF orientations 3, 6, 8 (card_orientation_N.jpg, card_orientation_6.webp),
    and a 480x360 wide.webp."""
    return fixture_data.card


@pytest.fixture(scope="session")
def messy(datasets_dir: Path) -> Path:
    folder = datasets_dir / "messy-images"
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing")
    return folder


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def _mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size RGB images, on 0..255."""
    assert a.size == b.size
    return float(np.abs(_arr(a.convert("RGB")) - _arr(b.convert("RGB"))).mean())


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    """A smooth, non-symmetric RGB test card."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    r = np.broadcast_to(x, (height, width))
    g = np.broadcast_to(y, (height, width))
    b = (r + g) / 2
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- the folder


def test_expectations_cover_the_whole_folder(messy: Path) -> None:
    assert sorted(p.name for p in messy.iterdir()) == sorted(EXPECTED)
    assert len(EXPECTED) == 39


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_messy_file_outcome(messy: Path, name: str) -> None:
    expected = EXPECTED[name]
    if isinstance(expected, str):
        with pytest.raises(ImageError) as info:
            open_image(messy / name)
        assert info.value.reason == expected, str(info.value)
        assert name in str(info.value)
        if name in PILLOW_MESSAGE:
            assert PILLOW_MESSAGE[name] in str(info.value)
        return
    im = open_image(messy / name)
    assert type(im) is Image.Image  # detached: not an ImageFile holding a file
    assert im.mode == "RGB"
    assert im.size == expected
    pixels = np.asarray(im)
    assert pixels.shape == (expected[1], expected[0], 3)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_result_from_path_bytes_and_file_object(messy: Path, name: str) -> None:
    data = (messy / name).read_bytes()
    expected = EXPECTED[name]
    if isinstance(expected, str):
        for source in (data, io.BytesIO(data)):
            with pytest.raises(ImageError) as info:
                open_image(source)
            assert info.value.reason == expected
        return
    from_path = open_image(messy / name)
    for im in (open_image(data), image_from_bytes(data), open_image(io.BytesIO(data))):
        assert im.mode == "RGB"
        assert im.size == expected
        assert np.array_equal(np.asarray(im), np.asarray(from_path))


def test_no_file_handles_leak(messy: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    for name in sorted(EXPECTED):  # warm up plugin imports first
        try:
            open_image(messy / name)
        except ImageError:
            pass
    gc.collect()
    before = _open_fds()
    for _ in range(3):
        for name in sorted(EXPECTED):
            try:
                open_image(str(messy / name))
            except ImageError:
                pass
    gc.collect()
    assert _open_fds() == before


def test_global_pillow_and_warning_state_untouched(messy: Path) -> None:
    max_pixels = Image.MAX_IMAGE_PIXELS
    load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    filters = list(warnings.filters)
    for name in sorted(EXPECTED):
        try:
            open_image(messy / name)
        except ImageError:
            pass
    assert Image.MAX_IMAGE_PIXELS == max_pixels
    assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated is False
    assert warnings.filters == filters


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    "name",
    [
        "card_orientation_3.jpg",
        "card_orientation_6.jpg",
        "card_orientation_8.jpg",
        "card_orientation_6.webp",
    ],
)
def test_exif_orientation_matches_upright_card(card: Path, name: str) -> None:
    upright = open_image(card / "card.jpg")
    rotated = open_image(card / name)
    assert rotated.size == upright.size
    assert _mad(rotated, upright) < 20  # measured under 1 (JPEG/WebP noise)
    # Without transposing, the same file is far from the card, so the check bites.
    with Image.open(card / name) as raw:
        assert raw.getexif().get(0x0112) in (3, 6, 8)
        assert _mad(raw.convert("RGB"), upright) > 40  # measured about 115


def test_orientation_rectangle_becomes_portrait(messy: Path) -> None:
    with Image.open(messy / "orientation_rectangle.jpg") as raw:
        assert raw.size == (2, 1)
        assert raw.getexif().get(0x0112) == 8
    assert open_image(messy / "orientation_rectangle.jpg").size == (1, 2)


def test_broken_exif_falls_back_to_untransposed(card: Path, monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise ZeroDivisionError("bad EXIF rational")

    monkeypatch.setattr(ImageOps, "exif_transpose", explode)
    im = open_image(card / "card_orientation_6.jpg")
    with Image.open(card / "card_orientation_6.jpg") as raw:
        assert np.array_equal(np.asarray(im), np.asarray(raw.convert("RGB")))
    assert _mad(im, open_image(card / "card.jpg")) > 40  # really untransposed


@pytest.mark.parametrize("name", ["broken_exif_dpi.jpg", "exif-dpi-zerodivision.jpg"])
def test_broken_exif_files_decode_to_real_pictures(messy: Path, name: str) -> None:
    im = open_image(messy / name)
    with Image.open(messy / name) as raw:
        assert _mad(im, raw.convert("RGB")) == 0  # orientation 1: pixels unchanged
    assert np.asarray(im).std() > 10


# --------------------------------------------------------------------------- colour modes


def test_rgba_png_transparent_pixels_become_white(messy: Path) -> None:
    with Image.open(messy / "pil123rgba.png") as raw:
        rgba = np.asarray(raw.convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    transparent = alpha[..., 0] == 0
    opaque = alpha[..., 0] == 1
    partial = ~transparent & ~opaque
    assert transparent.sum() > 1000 and opaque.sum() > 1000 and partial.sum() > 0
    out = np.asarray(open_image(messy / "pil123rgba.png")).astype(np.float64)
    assert (out[transparent] == 255).all()
    assert np.array_equal(out[opaque], rgba[..., :3][opaque])
    blended = rgba[..., :3] * alpha + 255.0 * (1 - alpha)
    assert np.abs(out[partial] - blended[partial]).max() <= 1.5


def test_psd_transparent_area_is_white_and_red_stays_red(messy: Path) -> None:
    with Image.open(messy / "rgba.psd") as raw:
        alpha = np.asarray(raw)[..., 3]
    out = np.asarray(open_image(messy / "rgba.psd"))
    assert (alpha == 0).any() and (alpha == 255).any()
    assert (out[alpha == 0] == 255).all()
    assert (out[alpha == 255] == (255, 0, 0)).all()


def test_grey_with_trns_chunk_is_composited(messy: Path) -> None:
    with Image.open(messy / "l_trns.png") as raw:
        assert raw.mode == "L" and raw.info["transparency"] == 255
        grey = np.asarray(raw)
    out = np.asarray(open_image(messy / "l_trns.png"))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=-1))


def test_16bit_tiff_is_scaled_not_clipped(messy: Path) -> None:
    with Image.open(messy / "16bit.cropped.tif") as raw:
        assert raw.mode == "I;16"
        raw16 = np.asarray(raw).astype(np.int64)
        clipped = np.asarray(raw.convert("L"))
    assert raw16.min() == 291 and raw16.max() == 694  # a 10-bit range in a 16-bit file
    assert (clipped == 255).all()  # what a plain convert("L") would give
    out = np.asarray(open_image(messy / "16bit.cropped.tif"))
    grey = out[..., 0]
    assert (out[..., 1] == grey).all() and (out[..., 2] == grey).all()
    assert 20 < grey.mean() < 235
    assert grey.max() - grey.min() > 50
    # Linear in the source: brightest and darkest source pixels stay that way.
    assert grey.flat[raw16.argmax()] == grey.max()
    assert grey.flat[raw16.argmin()] == grey.min()
    assert grey.max() == round(694 * 255 / 1023)


def test_16bit_rgba_tiff_keeps_its_colours(messy: Path) -> None:
    out = np.asarray(open_image(messy / "tiff_16bit_RGBa.tiff"))
    assert out.std() > 10
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize("name", ["pil_sample_cmyk.jpg", "tiff_strip_cmyk_jpeg.tif"])
def test_cmyk_converts_to_rgb(messy: Path, name: str) -> None:
    with Image.open(messy / name) as raw:
        assert raw.mode == "CMYK"
    im = open_image(messy / name)
    r, g, b = im.getpixel((0, 0))  # Pillow's own test: top-left is C0 M~1 Y~1 K0
    assert r > 200 and g < 60 and b < 60
    assert max(im.getpixel((99, 99))) < 30  # bottom-right is black


def test_cmyk_jpeg_and_cmyk_tiff_agree(messy: Path) -> None:
    a = open_image(messy / "pil_sample_cmyk.jpg")
    b = open_image(messy / "tiff_strip_cmyk_jpeg.tif")
    assert _mad(a, b) < 2


@pytest.mark.parametrize("name", ["card.png", "card.bmp", "card.tif", "card.gif", "card.webp"])
def test_other_encodings_of_the_card_look_like_the_card(card: Path, name: str) -> None:
    assert _mad(open_image(card / name), open_image(card / "card.jpg")) < 6  # measured <= 1.7


def _coarse_grey(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=float).ravel()


def test_one_bit_image_is_black_and_white_hopper(messy: Path) -> None:
    out = open_image(messy / "hopper_1bit.pbm")
    assert set(np.unique(np.asarray(out))) == {0, 255}
    ref = open_image(messy / "hopper.jpg")
    # Pixel-wise the dithered copy differs a lot, but at 16x16 it correlates
    # with hopper (measured 0.82) and not with a rotated hopper (0.15-0.30).
    assert np.corrcoef(_coarse_grey(out), _coarse_grey(ref))[0, 1] > 0.7
    assert np.corrcoef(_coarse_grey(out), _coarse_grey(ref.rotate(180)))[0, 1] < 0.5


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (0, 255), (0, 0, 0)),
        ("La", (0, 0), (255, 255, 255)),
        ("La", (64, 128), (191, 191, 191)),  # premultiplied: L = 64 * 255 / 128
        ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBa", (100, 0, 0, 100), (255, 155, 155)),  # unpremultiplied red at alpha 100
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 0, (0, 0, 0)),
        ("I;16B", 65535, (255, 255, 255)),
        ("I", 200, (200, 200, 200)),  # 8-bit data in an int32 image is unchanged
        ("F", 0.5, (128, 128, 128)),  # floats in [0, 1]
        ("F", 200.0, (200, 200, 200)),  # floats in [0, 255]
    ],
)
def test_mode_conversion(mode: str, value, expected) -> None:
    im = Image.new(mode, (3, 2), value)
    out = images._to_rgb(im)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert np.abs(np.asarray(out).astype(int) - expected).max() <= 2, np.asarray(out)[0, 0]


def test_palette_transparency_composited_on_white() -> None:
    im = Image.new("P", (4, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    im.putdata([0, 1, 0, 1])
    im.info["transparency"] = 0
    out = open_image(_encode(im, "PNG"))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (255, 0, 0)] * 2
    out = open_image(_encode(im, "GIF", transparency=0))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (255, 0, 0)] * 2


def test_pa_image_composited_on_white() -> None:
    im = Image.new("PA", (2, 1))
    im.putpalette([0, 0, 255] + [0] * 765)
    im.putdata([(0, 0), (0, 255)])
    out = images._to_rgb(im)
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


def test_full_range_16bit_png_maps_linearly() -> None:
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(ramp)  # mode I;16
    for data in (_encode(im, "PNG"), _encode(im, "TIFF")):
        out = np.asarray(open_image(data))[0, :, 0]
        assert out.tolist() == [0, 1, 128, 255]


def test_float_tiff_outside_unit_range_is_stretched() -> None:
    arr = np.array([[-1.0, 0.0, 1.0, 3.0]], dtype=np.float32)
    out = np.asarray(open_image(_encode(Image.fromarray(arr), "TIFF")))[0, :, 0]
    assert out.tolist() == [0, 64, 128, 255]


# --------------------------------------------------------------------------- frames


def test_animated_gif_and_webp_use_first_frame() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    for fmt in ("GIF", "PNG", "WEBP"):
        params = {"lossless": True} if fmt == "WEBP" else {}
        data = _encode(red, fmt, save_all=True, append_images=[blue], duration=100, **params)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.n_frames == 2, fmt
        out = open_image(data)
        assert out.getpixel((4, 4)) == (255, 0, 0), fmt


def test_animated_file_object_left_on_a_later_frame_still_gives_first() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    fh = io.BytesIO(_encode(red, "GIF", save_all=True, append_images=[blue]))
    fh.seek(500)  # Pillow reads from the start regardless
    assert open_image(fh).getpixel((0, 0)) == (255, 0, 0)


def test_extents_bomb_lives_in_the_second_frame(messy: Path) -> None:
    with Image.open(messy / "decompression_bomb_extents.gif") as raw:
        assert raw.size == (100, 100)
        with pytest.raises(Image.DecompressionBombError):
            raw.seek(1)
    out = np.asarray(open_image(messy / "decompression_bomb_extents.gif"))
    assert out.shape == (100, 100, 3)


# --------------------------------------------------------------------------- draft mode


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return _encode(_gradient(4000, 3000), "JPEG", quality=90)


def test_draft_shrinks_big_jpeg_but_keeps_shorter_side(big_jpeg: bytes) -> None:
    im = open_image(big_jpeg, draft_size=448)
    assert im.mode == "RGB"
    assert min(im.size) >= 448
    assert im.size[0] < 4000 and im.size[1] < 3000
    # Pillow picks the largest of 1/2, 1/4, 1/8 keeping both sides >= 448:
    # min(4000 // 448, 3000 // 448) = 6 -> 1/4.
    assert im.size == (1000, 750)
    reference = _gradient(4000, 3000).resize(im.size, Image.Resampling.BOX)
    assert _mad(im, reference) < 4


def test_draft_none_decodes_full_size(big_jpeg: bytes) -> None:
    assert open_image(big_jpeg, draft_size=None).size == (4000, 3000)


def test_draft_applies_before_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_gradient(4000, 3000), "JPEG", exif=exif.tobytes())
    im = open_image(data, draft_size=448)
    assert im.size == (750, 1000)  # drafted to 1000x750, then rotated
    # Orientation 6: rotate 270 degrees; the dark corner (0, 0) moves to the top right.
    assert sum(im.getpixel((749, 0))) < 30
    assert sum(im.getpixel((0, 999))) > 600


@pytest.mark.parametrize(
    ("size", "draft_size", "expected"),
    [
        ((896, 1200), 448, (896, 1200)),  # shorter side not above 2 * 448: untouched
        ((900, 1200), 448, (450, 600)),
        ((3000, 4000), 224, (375, 500)),  # 1/8
        ((1000, 1000), 100, (125, 125)),
    ],
)
def test_draft_thresholds(size, draft_size, expected) -> None:
    im = open_image(_encode(_gradient(*size), "JPEG"), draft_size=draft_size)
    assert im.size == expected
    assert min(im.size) >= draft_size


def test_draft_ignored_for_non_jpeg() -> None:
    data = _encode(_gradient(1200, 1000), "PNG")
    assert open_image(data, draft_size=224).size == (1200, 1000)


def test_draft_size_and_max_pixels_validated() -> None:
    for kwargs in ({"draft_size": 0}, {"max_pixels": 0}, {"max_pixels": 1.5}, {"draft_size": True}):
        with pytest.raises(ValueError) as info:
            open_image(b"x", **kwargs)
        assert not isinstance(info.value, ImageError)


# --------------------------------------------------------------------------- size guards


def test_max_pixels_boundaries(card: Path) -> None:
    path = card / "card.jpg"  # 128 x 128 = 16384 px
    assert open_image(path, max_pixels=16384).size == (128, 128)
    for max_pixels, reason in ((16383, "too_large"), (8192, "too_large"), (8191, "decompression_bomb")):
        with pytest.raises(ImageError) as info:
            open_image(path, max_pixels=max_pixels)
        assert info.value.reason == reason, max_pixels
        assert "16384" in str(info.value)


def test_size_checked_before_decoding(card: Path, monkeypatch) -> None:
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as info:
        open_image(card / "wide.webp", max_pixels=1000)
    assert info.value.reason == "decompression_bomb"


def test_guard_does_not_rely_on_pillow_global(messy: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone disabled Pillow's guard
    with pytest.raises(ImageError) as info:
        open_image(messy / "decompression_bomb.gif")
    assert info.value.reason == "decompression_bomb"
    assert "4364696535" in str(info.value)  # 65535 x 66601 as read from the header


def test_our_limit_governs_and_warning_filters_untouched(card: Path, monkeypatch) -> None:
    # the card is 16384 px: between Pillow's 1x and 2x limits, so Pillow only warns.
    # Our own max_pixels decides; the process-wide warning filters are never swapped
    # (catch_warnings is not thread-safe and the server decodes in threads).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    filters = list(warnings.filters)
    with pytest.raises(ImageError) as info, pytest.warns(Image.DecompressionBombWarning):
        open_image(card / "card.jpg", max_pixels=10_000)
    assert info.value.reason in ("too_large", "decompression_bomb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert open_image(card / "card.jpg", max_pixels=10**9).size == (128, 128)
    assert warnings.filters == filters


def test_default_limit() -> None:
    assert DEFAULT_MAX_PIXELS == 64_000_000


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _png_header(width: int, height: int) -> bytes:
    """PNG signature + IHDR (8-bit RGB) only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def _tiny_huge_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG that declares width x height: one short IDAT, then IEND."""
    idat = zlib.compress(b"\0" * 1000)
    return _png_header(width, height) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_huge_declared_png_is_refused_from_its_header(monkeypatch) -> None:
    data = _tiny_huge_png(20_000, 20_000)  # 400 Mpx declared in ~100 bytes
    assert len(data) < 200
    with Image.open(io.BytesIO(_tiny_huge_png(2_000, 2_000))) as raw:
        assert raw.size == (2_000, 2_000)  # the crafted file really parses
    with pytest.raises(ImageError) as info:
        open_image(data)
    assert info.value.reason == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our own guard alone
    with pytest.raises(ImageError) as info:
        open_image(data)
    assert info.value.reason == "decompression_bomb"
    assert "20000x20000" in str(info.value)
    with pytest.raises(ImageError) as info:
        open_image(_tiny_huge_png(10_000, 10_000), max_pixels=60_000_000)  # 100 Mpx
    assert info.value.reason == "too_large"


def test_png_header_without_data_is_truncated() -> None:
    with pytest.raises(ImageError) as info:
        open_image(_png_header(64, 64))
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0)])
def test_zero_size_png_header(width: int, height: int) -> None:
    with pytest.raises(ImageError) as info:
        open_image(_png_header(width, height) + b"\0" * 32)
    assert info.value.reason == "zero_size"


# --------------------------------------------------------------------------- broken input


def test_truncated_jpeg_made_here(card: Path) -> None:
    data = (card / "card.jpg").read_bytes()
    with pytest.raises(ImageError) as info:
        open_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_made_here(card: Path) -> None:
    data = (card / "card.png").read_bytes()
    with pytest.raises(ImageError) as info:
        open_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"


def test_pillow_error_is_chained(fixture_data) -> None:
    with pytest.raises(ImageError) as info:
        open_image(fixture_data.root / "broken" / "truncated.jpg")
    assert isinstance(info.value.__cause__, OSError)


def test_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for source in (b"", bytearray(), io.BytesIO(), empty, str(empty)):
        with pytest.raises(ImageError) as info:
            open_image(source)
        assert info.value.reason == "empty", source
    with pytest.raises(ImageError) as info:
        image_from_bytes(b"")
    assert info.value.reason == "empty"


def test_missing_path(tmp_path: Path) -> None:
    for source in (tmp_path / "nope.jpg", str(tmp_path / "nope.jpg"), tmp_path / "no" / "dir.png"):
        with pytest.raises(ImageError) as info:
            open_image(source)
        assert info.value.reason == "not_found"
        assert "nope.jpg" in str(info.value) or "dir.png" in str(info.value)


def test_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        open_image(tmp_path)
    assert info.value.reason == "not_found"


def test_text_and_html_are_not_images(tmp_path: Path) -> None:
    page = b"<!doctype html><html><body>404 Not Found</body></html>\n"
    text = tmp_path / "photo.jpg"  # a misleading extension does not matter
    text.write_bytes(page)
    for source in (text, page, io.BytesIO(b"hello world\n")):
        with pytest.raises(ImageError) as info:
            open_image(source)
        assert info.value.reason == "not_an_image"


def test_wrong_source_types() -> None:
    for source in (123, None, io.StringIO("not binary")):
        with pytest.raises(TypeError):
            open_image(source)
    with pytest.raises(TypeError):
        image_from_bytes("a string")


# --------------------------------------------------------------------------- sources


def test_file_object_is_left_open_for_the_caller(card: Path) -> None:
    with open(card / "card.png", "rb") as fh:
        im = open_image(fh)
        assert not fh.closed
    assert im.size == (128, 128)
    im.load()  # still usable after the file is gone


class _Pipe(io.RawIOBase):
    """A readable, non-seekable stream (like a socket or HTTP body)."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        chunk = self._data.read(len(buf))
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_stream(card: Path) -> None:
    data = (card / "card.webp").read_bytes()
    pipe = _Pipe(data)
    assert not pipe.seekable()
    im = open_image(pipe)
    assert im.size == (128, 128) and im.mode == "RGB"
    with pytest.raises(ImageError) as info:
        open_image(_Pipe(b""))
    assert info.value.reason == "empty"


def test_bytes_like_sources(card: Path) -> None:
    data = (card / "card.gif").read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        assert open_image(source).size == (128, 128)
    with pytest.raises(ImageError) as info:  # keyword arguments are passed through
        image_from_bytes(bytearray(data), max_pixels=100, draft_size=None)
    assert info.value.reason == "decompression_bomb"


# --------------------------------------------------------------------------- ImageError


def test_image_error_contract() -> None:
    err = ImageError("truncated", "x.jpg: image file is truncated")
    assert isinstance(err, ValueError)
    assert err.reason == "truncated"
    assert str(err) == "x.jpg: image file is truncated"
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, str(again)) == (err.reason, str(err))
    with pytest.raises(ValueError):
        ImageError("nonsense", "no such reason")
    assert REASONS == {
        "not_found", "empty", "not_an_image", "truncated", "decompression_bomb",
        "too_large", "zero_size", "corrupt", "unsupported", "unreadable", "download_failed", "bad_url",
    }


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError("image file is truncated (3 bytes not processed)"), "truncated"),
        (EOFError("no more data"), "truncated"),
        (struct.error("unpack requires a buffer of 4 bytes"), "truncated"),
        (SyntaxError("broken PNG file"), "corrupt"),
        (OSError("broken data stream when reading image file"), "corrupt"),
        (OSError("decoder jpeg2k not available"), "unsupported"),
        (ValueError("conversion from LAB to P not supported"), "unsupported"),
        (ValueError("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK"), "decompression_bomb"),
        (ZeroDivisionError("division by zero"), "corrupt"),
    ],
)
def test_exception_classification(exc: BaseException, reason: str) -> None:
    err = images._classify(exc, "f.img")
    assert err.reason == reason
    assert str(err).startswith("f.img: ")


# --------------------------------------------------------------------------- sha256


def test_file_sha256(tmp_path: Path, card: Path) -> None:
    big = tmp_path / "big.bin"
    payload = os.urandom(1024) * 2600  # ~2.5 MiB: several 1 MiB chunks
    big.write_bytes(payload)
    assert file_sha256(big) == hashlib.sha256(payload).hexdigest()
    assert file_sha256(str(big)) == file_sha256(big)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()
    jpg = card / "card.jpg"
    digest = file_sha256(jpg)
    assert len(digest) == 64 and digest == hashlib.sha256(jpg.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")


def test_file_sha256_reads_in_1mib_chunks(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * (3 * 1024 * 1024 + 5))
    sizes: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self._fh = fh

        def read(self, n=-1):
            sizes.append(n)
            return self._fh.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    monkeypatch.setattr(images, "open", lambda p, m="r": Spy(real_open(p, m)), raising=False)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sizes and set(sizes) == {1 << 20}
    assert len(sizes) == 5  # 3 full chunks, 1 partial, 1 empty
