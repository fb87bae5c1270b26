"""Bounded cost per image: whatever a file claims, one open_image call costs
memory and CPU in proportion to the pixels it decodes, bounded before decoding.

Hostile files are generated here (no shared data needed): thin PNGs, small
files that declare huge images (WebP, 16-bit PNG, an ICO whose embedded PNG is
larger than its directory says), a 108 Mpx JPEG.  Memory is measured as the
peak resident set of a fresh subprocess (``/proc/self/clear_refs`` resets the
high-water mark; ``VmHWM`` reads it), because Pillow allocates pixels with
``malloc``, out of ``tracemalloc``'s sight.

Peaks measured on this machine before and after the change (MB):
1 x 100000 PNG + open_clip preprocess 20421 -> 6; 8000 x 8000 lossless WebP
(2.5 KB) 979 -> 0 (refused); 8000 x 8000 16-bit PNG 1710 -> 554; ICO claiming
16 x 16 holding 13375 x 13375 PNG 685 -> 0 (refused before decoding);
12000 x 9000 JPEG refused -> 14 (decoded at 1/8).
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from indexer import images
from indexer.images import (
    DECODE_MEMORY_ENV,
    DEFAULT_MAX_DECODE_BYTES,
    MAX_ASPECT_RATIO,
    SMALL_DECODE_BYTES,
    DecodeMemoryBudget,
    ImageError,
    decode_memory_budget,
    estimate_decode_bytes,
    open_image,
)

pytestmark = pytest.mark.unit

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- hostile files


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _zero_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A valid PNG of all-zero pixels, compressed row by row (never held whole in memory)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)
    comp = zlib.compressobj(6)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _lying_ico(embedded_png: bytes) -> bytes:
    """An ICO whose one directory entry says 16 x 16, 32 bpp, holding ``embedded_png``."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(embedded_png), 6 + 16)
    return header + entry + embedded_png


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_webp() -> bytes:
    """8000 x 8000 px lossless WebP of one colour: a few dozen bytes."""
    data = _encode(Image.new("RGB", (8000, 8000), (90, 120, 200)), "WEBP", lossless=True, method=0)
    assert len(data) < 4096
    return data


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    """A 108 Mpx (12000 x 9000) JPEG, as phone cameras write; greyscale to keep the fixture cheap."""
    return _encode(Image.new("L", (12000, 9000), 128), "JPEG", quality=85)


def _peak_mb(tmp_path: Path, data: bytes, **kwargs) -> tuple[str, float]:
    """(outcome, peak RSS growth in MB) of one open_image call in a fresh interpreter.

    outcome is the returned size as "WxH" or the ImageError reason.
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    child = r"""
import json, sys, warnings
from indexer.images import ImageError, open_image
warnings.simplefilter("ignore")
data = open(sys.argv[1], "rb").read()
kwargs = json.loads(sys.argv[2])
def status(key):
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = status("VmRSS")
try:
    im = open_image(data, **kwargs)
    outcome = f"{im.size[0]}x{im.size[1]}"
except ImageError as e:
    outcome = e.reason
print(json.dumps([outcome, status("VmHWM") - base]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", child, str(path), json.dumps(kwargs)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return outcome, peak


# --------------------------------------------------------------------------- 1. thin images


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1, 100_000), (1, MAX_ASPECT_RATIO)),
        ((100_000, 1), (MAX_ASPECT_RATIO, 1)),
        ((3, 1000), (3, 3 * MAX_ASPECT_RATIO)),
        ((2000, 10), (10 * MAX_ASPECT_RATIO, 10)),
    ],
)
def test_thin_image_is_centre_cropped_to_the_aspect_limit(size, expected) -> None:
    # A 1 x 100000 PNG is a few hundred bytes; resizing its shorter side to 224 px
    # (open_clip's Resize) made it 224 x 22.4 M px: 20 GB.
    data = _encode(Image.new("RGB", size, (200, 10, 10)), "PNG")
    assert len(data) < 4096
    im = open_image(data)
    assert im.size == expected
    assert max(im.size) <= MAX_ASPECT_RATIO * min(im.size)
    assert im.info["original_size"] == size
    assert im.getpixel((0, 0)) == (200, 10, 10)
    # What any model's shorter-side resize to 224 px would produce is bounded.
    scale = 224 / min(im.size)
    assert max(im.size) * scale <= 224 * MAX_ASPECT_RATIO


def test_crop_keeps_the_centre() -> None:
    strip = Image.new("RGB", (1, 3000), (0, 0, 255))
    strip.paste((0, 255, 0), (0, 1400, 1, 1600))  # a green band around the middle
    im = open_image(_encode(strip, "PNG"))
    assert im.size == (1, MAX_ASPECT_RATIO)
    assert all(im.getpixel((0, y)) == (0, 255, 0) for y in range(im.size[1]))


def test_ordinary_panorama_is_not_cropped() -> None:
    im = open_image(_encode(Image.new("RGB", (3000, 300)), "PNG"))
    assert im.size == (3000, 300)


def test_thin_png_and_its_resize_stay_small(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (1, 100_000), (200, 10, 10)), "PNG")
    outcome, peak = _peak_mb(tmp_path, data)
    assert outcome == f"1x{MAX_ASPECT_RATIO}"
    assert peak < 300


# --------------------------------------------------------------------------- 2. small files that decode huge


def test_webp_canvas_is_judged_from_its_header_before_open(big_webp: bytes, monkeypatch) -> None:
    from PIL import _webp

    def no_decoder(*args, **kwargs):
        raise AssertionError("the WebP decoder (and its canvas) was created")

    monkeypatch.setattr(_webp, "WebPAnimDecoder", no_decoder)
    with pytest.raises(ImageError) as info:
        open_image(big_webp)  # 64 Mpx: under max_pixels, but libwebp needs far more than 1 GiB
    assert info.value.reason == "too_large"
    assert "8000x8000" in str(info.value)


def test_small_webp_that_decodes_huge_stays_small(tmp_path: Path, big_webp: bytes) -> None:
    outcome, peak = _peak_mb(tmp_path, big_webp)
    assert outcome == "too_large"
    assert peak < 300


def test_webp_within_budget_still_decodes() -> None:
    data = _encode(Image.new("RGB", (300, 200), (90, 120, 200)), "WEBP", lossless=True)
    im = open_image(data)
    assert im.size == (300, 200)
    assert im.getpixel((10, 10)) == (90, 120, 200)


def test_ico_is_judged_by_its_embedded_png_before_open(monkeypatch) -> None:
    ico = _lying_ico(_zero_png(3000, 3000, 8, 6))
    with pytest.warns(UserWarning, match="expected size"), Image.open(io.BytesIO(ico)) as raw:
        assert raw.size == (3000, 3000)  # the crafted file really decodes in Pillow

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the embedded PNG was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as info:
        open_image(ico, max_pixels=1_000_000)  # 9 Mpx > 2 x 1 Mpx
    assert info.value.reason == "decompression_bomb"
    assert "3000x3000" in str(info.value)


def test_lying_ico_stays_small(tmp_path: Path) -> None:
    # Claims 16 x 16; holds 8000 x 8000 RGBA: 256 MB decoded, over 1 GB converted.
    ico = _lying_ico(_zero_png(8000, 8000, 8, 6))
    assert len(ico) < 1_000_000
    outcome, peak = _peak_mb(tmp_path, ico)
    assert outcome == "too_large"
    assert peak < 300


def test_honest_ico_still_decodes() -> None:
    data = _encode(Image.new("RGBA", (64, 64), (255, 0, 0, 255)), "ICO", sizes=[(64, 64), (32, 32)])
    im = open_image(data)
    assert im.size == (64, 64)
    assert im.getpixel((5, 5)) == (255, 0, 0)


def test_16bit_png_is_refused_by_the_byte_budget() -> None:
    data = _zero_png(4000, 4000, 16, 0)  # 16 Mpx of 16-bit grey in ~60 KB
    assert len(data) < 200_000
    needed = estimate_decode_bytes((4000, 4000), "I;16")
    assert needed > estimate_decode_bytes((4000, 4000), "L")  # 16-bit costs more
    with pytest.raises(ImageError) as info:
        open_image(data, max_decode_bytes=needed - 1)
    assert info.value.reason == "too_large"
    assert open_image(data, max_decode_bytes=needed).size == (4000, 4000)


def test_16bit_png_decodes_within_its_estimate(tmp_path: Path) -> None:
    # Scaling 16-bit grey to 8 bits went through float64 copies of the whole
    # image: an 8000 x 8000 16-bit PNG of 122 KB peaked at 1.7 GB.
    data = _zero_png(6000, 6000, 16, 0)
    outcome, peak = _peak_mb(tmp_path, data)
    assert outcome == "6000x6000"
    assert peak * MB < estimate_decode_bytes((6000, 6000), "I;16")
    assert peak < 450


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda: _zero_png(3000, 3000, 8, 6), "RGBA"),
        (lambda: _zero_png(3000, 3000, 8, 0), "L"),
        (lambda: _encode(Image.new("CMYK", (3000, 3000), (0, 50, 100, 0)), "JPEG"), "CMYK"),
        (lambda: _encode(Image.new("F", (3000, 3000), 0.5), "TIFF"), "F"),
    ],
    ids=["png-rgba", "png-l", "jpeg-cmyk", "tiff-float"],
)
def test_estimate_bounds_the_measured_peak(tmp_path: Path, make, mode) -> None:
    outcome, peak = _peak_mb(tmp_path, make(), draft_size=None)
    assert outcome == "3000x3000"
    assert peak * MB <= estimate_decode_bytes((3000, 3000), mode)


def test_byte_limit_is_checked_before_decoding(monkeypatch) -> None:
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as info:
        open_image(_zero_png(2000, 2000), max_decode_bytes=10 * MB)
    assert info.value.reason == "too_large"
    assert "MiB" in str(info.value)


def test_progressive_jpeg_counts_its_coefficient_buffer() -> None:
    im = Image.new("RGB", (1600, 1200), (10, 20, 30))
    baseline = _encode(im, "JPEG")
    progressive = _encode(im, "JPEG", progressive=True)
    with Image.open(io.BytesIO(baseline)) as b, Image.open(io.BytesIO(progressive)) as p:
        assert images._decoder_bytes(b, io.BytesIO(baseline)) == 0
        # 4:2:0: full-resolution Y plus quarter-size Cb and Cr, 2 bytes per coefficient.
        assert images._decoder_bytes(p, io.BytesIO(progressive)) == 1600 * 1200 * 3


def test_max_decode_bytes_validated() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError) as info:
            open_image(b"x", max_decode_bytes=bad)
        assert not isinstance(info.value, ImageError)
    assert DEFAULT_MAX_DECODE_BYTES == 1 << 30


# --------------------------------------------------------------------------- 2b. the process-wide budget


def _rgb_png(width: int, height: int) -> bytes:
    return _zero_png(width, height, 8, 2)


def test_concurrent_large_decodes_stay_within_the_budget() -> None:
    data = _rgb_png(2600, 2600)
    need = estimate_decode_bytes((2600, 2600), "RGB")
    assert need > SMALL_DECODE_BYTES
    budget = DecodeMemoryBudget(need + need // 2)  # room for one at a time
    results: list = []

    def work() -> None:
        results.append(open_image(data, memory_budget=budget).size)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [(2600, 2600)] * 4
    assert budget.peak_bytes == need
    assert budget.in_use_bytes == 0


def test_small_images_do_not_wait_and_large_ones_do() -> None:
    budget = DecodeMemoryBudget(200 * MB)
    small = _encode(Image.new("RGB", (640, 480), (1, 2, 3)), "PNG")
    large = _rgb_png(2600, 2600)
    done: dict[str, tuple[int, int]] = {}

    def decode(name: str, data: bytes) -> None:
        done[name] = open_image(data, memory_budget=budget).size

    with budget.reserve(200 * MB):  # somebody else holds the whole budget
        blocked = threading.Thread(target=decode, args=("large", large))
        blocked.start()
        free = threading.Thread(target=decode, args=("small", small))
        free.start()
        free.join(timeout=60)
        assert done.get("small") == (640, 480)
        blocked.join(timeout=0.5)
        assert blocked.is_alive() and "large" not in done
    blocked.join(timeout=120)
    assert done["large"] == (2600, 2600)


def test_estimate_over_the_whole_budget_is_refused_not_queued() -> None:
    budget = DecodeMemoryBudget(SMALL_DECODE_BYTES + 1)
    with pytest.raises(ImageError) as info:
        open_image(_rgb_png(2600, 2600), memory_budget=budget)
    assert info.value.reason == "too_large"
    assert budget.in_use_bytes == 0


def test_budget_is_released_after_a_failed_decode() -> None:
    budget = DecodeMemoryBudget(1 << 30)
    data = _rgb_png(2600, 2600)
    broken = data[: len(data) // 2]
    with pytest.raises(ImageError):
        open_image(broken, memory_budget=budget)
    assert budget.in_use_bytes == 0


def test_budget_from_environment(monkeypatch) -> None:
    def fresh_budget(value: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != DECODE_MEMORY_ENV}
        if value is not None:
            env[DECODE_MEMORY_ENV] = value
        code = "from indexer.images import decode_memory_budget as b; print(b().capacity_bytes)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        if proc.returncode:
            return -1
        return int(proc.stdout)

    assert fresh_budget("123456789") == 123456789
    assert fresh_budget("lots") == -1  # a clear ValueError at first use
    default = fresh_budget(None)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert SMALL_DECODE_BYTES < default <= physical // 4
    assert decode_memory_budget() is decode_memory_budget()


def test_budget_rejects_bad_capacity() -> None:
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError):
            DecodeMemoryBudget(bad)


# --------------------------------------------------------------------------- 3. MemoryError


class _ExhaustedStream(io.RawIOBase):
    """A non-seekable stream whose read runs out of memory."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("not seekable")

    def read(self, size: int = -1) -> bytes:
        raise MemoryError


def test_memory_error_while_buffering_a_stream_is_too_large() -> None:
    with pytest.raises(ImageError) as info:
        open_image(_ExhaustedStream())
    assert info.value.reason == "too_large"


def test_memory_error_in_the_decoder_is_too_large(monkeypatch) -> None:
    def exhausted(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", exhausted)
    with pytest.raises(ImageError) as info:
        open_image(_rgb_png(64, 64))
    assert info.value.reason == "too_large"


def test_real_allocation_failure_is_too_large(tmp_path: Path) -> None:
    """Under an address-space limit the decoder's own allocations fail: still an ImageError."""
    path = tmp_path / "big.png"
    path.write_bytes(_rgb_png(4000, 4000))
    child = r"""
import resource, sys
from indexer.images import ImageError, open_image
data = open(sys.argv[1], "rb").read()
with open("/proc/self/statm") as fh:
    used = int(fh.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 40 * 2**20, resource.RLIM_INFINITY))
try:
    open_image(data)
    print("decoded")
except ImageError as e:
    print(e.reason)
"""
    proc = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "too_large"


# --------------------------------------------------------------------------- 4. phone photos


def test_108_megapixel_jpeg_decodes_at_reduced_size(phone_jpeg: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's 89 Mpx warning
        im = open_image(phone_jpeg, draft_size=448)
        assert im.size == (1500, 1125)  # decoded at 1/8: 1.7 Mpx
        assert im.info["original_size"] == (12000, 9000)
        with pytest.raises(ImageError) as info:
            open_image(phone_jpeg, draft_size=None)  # not reduced: 108 Mpx > 64 Mpx
        assert info.value.reason == "too_large"
        with pytest.raises(ImageError) as info:
            open_image(phone_jpeg, draft_size=448, max_pixels=1_000_000)  # 1.7 Mpx decoded
        assert info.value.reason == "too_large"


def test_108_megapixel_jpeg_stays_small(tmp_path: Path, phone_jpeg: bytes) -> None:
    outcome, peak = _peak_mb(tmp_path, phone_jpeg, draft_size=448)
    assert outcome == "1500x1125"
    assert peak < 300


def test_unreducible_formats_keep_the_limit_on_their_full_size() -> None:
    data = _rgb_png(1200, 1000)
    with pytest.raises(ImageError) as info:
        open_image(data, draft_size=224, max_pixels=1_000_000)
    assert info.value.reason == "too_large"
