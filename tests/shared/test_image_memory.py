"""Decoding a reference is bounded by the bytes it really holds at peak, known from the header.

Small files that decode to huge palette, 1-bit, greyscale, 16-bit or alpha images are refused
before a pixel is decoded, and an image accepted near the limit really stays under its bound:
peak RSS measured in a fresh process, since Pillow allocates pixels outside `tracemalloc`
(which sees a few hundred bytes of a 64 MiB `Image.new`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from shared import images
from shared.errors import InvalidInput
from shared.images import DECODER_SLACK_BYTES, MAX_DECODED_BYTES, decode_reference, peak_decode_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def saved(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """`image` encoded as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def bound_of(data: bytes) -> int:
    """The header-based peak for `data`."""
    with Image.open(io.BytesIO(data)) as im:
        return peak_decode_bytes(im, data)


# 1. Hostile images: small files, huge at peak. Each fits the old bound (1 byte a pixel for
#    palette, 1-bit and greyscale, 2 for 16-bit, 4 for the rest) and is refused now.

HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "palette_png_8192": (lambda: saved(Image.new("P", (8192, 8192)), "PNG"), "8192x8192 P, 322 MiB"),
    "palette_png_with_transparency": (
        lambda: saved(Image.new("P", (8192, 8192)), "PNG", transparency=0),
        "8192x8192 P, 514 MiB",
    ),
    "one_bit_png": (lambda: saved(Image.new("1", (8192, 8192)), "PNG"), "8192x8192 1, 322 MiB"),
    "greyscale_png": (lambda: saved(Image.new("L", (8192, 8192)), "PNG"), "8192x8192 L, 322 MiB"),
    "sixteen_bit_png": (lambda: saved(Image.new("I;16", (6000, 6000)), "PNG"), "6000x6000 I;16, 174 MiB"),
    "la_png": (lambda: saved(Image.new("LA", (5000, 5000)), "PNG"), "5000x5000 LA, 193 MiB"),
    "rgba_png": (lambda: saved(Image.new("RGBA", (5000, 5000)), "PNG"), "5000x5000 RGBA, 193 MiB"),
    "progressive_jpeg": (
        lambda: saved(Image.new("RGB", (5000, 5000)), "JPEG", progressive=True, subsampling=0),
        "5000x5000 RGB, 241 MiB",
    ),
    "webp": (lambda: saved(Image.new("RGB", (4000, 4000)), "WEBP"), "4000x4000 RGB, 247 MiB"),
}


@pytest.mark.parametrize("kind", list(HOSTILE), ids=list(HOSTILE))
def test_an_image_too_large_at_peak_is_refused_from_its_header_naming_field_and_peak(kind: str) -> None:
    build, found = HOSTILE[kind]
    data = build()
    assert len(data) < 1024 * 1024  # a small file...
    with Image.open(io.BytesIO(data)) as im:
        assert images.decoded_bytes(im) <= MAX_DECODED_BYTES  # ...that the old bound let through

    with pytest.raises(InvalidInput) as refused:
        decode_reference(data, field="file")

    assert refused.value.field == "file"
    assert str(refused.value).startswith(f"`file` is '{found} at peak': ")
    assert str(refused.value).endswith("MiB once decoded and converted to RGB; use a smaller image")


# 2. The bound counts every conversion step: the input and the output alive together.

STEP_BYTES_PER_PIXEL: dict[str, tuple[str, dict[str, Any], int]] = {
    "rgb_no_copy": ("RGB", {}, 4),
    "palette_straight_to_rgb": ("P", {}, 1 + 4),
    "palette_with_transparency": ("P", {"transparency": 0}, 4 + 4),  # P+RGBA, then RGBA+RGB
    "one_bit": ("1", {}, 1 + 4),
    "greyscale": ("L", {}, 1 + 4),
    "sixteen_bit": ("I;16", {}, 1 + 4),  # I;16+I;16, I;16+L, then L+RGB
    "thirty_two_bit": ("I", {}, 4 + 4),
    "la": ("LA", {}, 4 + 4),
    "pa": ("PA", {}, 4 + 4),
    "rgba_no_rgba_copy": ("RGBA", {}, 4 + 4),
    "cmyk": ("CMYK", {}, 4 + 4),
    "float": ("F", {}, 4 + 4),
}


@pytest.mark.parametrize("kind", list(STEP_BYTES_PER_PIXEL), ids=list(STEP_BYTES_PER_PIXEL))
def test_the_bound_counts_each_conversion_step_of_the_mode(kind: str) -> None:
    mode, info, bytes_per_pixel = STEP_BYTES_PER_PIXEL[kind]
    im = Image.new(mode, (64, 32))
    im.info.update(info)
    assert peak_decode_bytes(im, b"") == 64 * 32 * bytes_per_pixel + DECODER_SLACK_BYTES


def test_a_baseline_jpeg_whose_first_scan_lacks_a_component_counts_every_coefficient() -> None:
    # libjpeg keeps the whole image's DCT coefficients for multi-scan JPEGs, progressive or not.
    interleaved = saved(Image.new("RGB", (640, 480)), "JPEG", subsampling=0)
    sos = interleaved.index(b"\xff\xda")
    assert interleaved[sos + 4] == 3  # Pillow writes one scan of the three components
    one_component_scan = interleaved[:sos] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 64
    coefficients = 640 * 480 * 3 * 2

    assert bound_of(interleaved) == 640 * 480 * 4 + DECODER_SLACK_BYTES
    assert bound_of(one_component_scan) == 640 * 480 * 4 + coefficients + DECODER_SLACK_BYTES


# 3. Accepted near the limit, the real peak stays under the bound.

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS when it was forked.
MEASURE_PEAK = """
import io, sys
from PIL import Image
from shared.images import decode_reference
def status_bytes(name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))
data = open(sys.argv[1], "rb").read()
tiny = io.BytesIO()
Image.new("RGB", (16, 16)).save(tiny, sys.argv[2])
decode_reference(tiny.getvalue())  # the plugin and its library, loaded before measuring
before = status_bytes("VmRSS")
decode_reference(data)
print(status_bytes("VmHWM") - before)
"""

NEAR_LIMIT: dict[str, Callable[[], bytes]] = {
    "rgb_png": lambda: saved(Image.new("RGB", (5700, 5700), (10, 20, 30)), "PNG"),
    "palette_png": lambda: saved(Image.new("P", (5100, 5100), 3), "PNG"),
    "palette_png_with_transparency": lambda: saved(Image.new("P", (4000, 4000), 3), "PNG", transparency=3),
    "one_bit_png": lambda: saved(Image.new("1", (5100, 5100), 1), "PNG"),
    "greyscale_png": lambda: saved(Image.new("L", (5100, 5100), 90), "PNG"),
    "sixteen_bit_png": lambda: saved(Image.new("I;16", (5100, 5100), 30000), "PNG"),
    "la_png": lambda: saved(Image.new("LA", (4000, 4000), (90, 128)), "PNG"),
    "rgba_png": lambda: saved(Image.new("RGBA", (4000, 4000), (10, 20, 30, 128)), "PNG"),
    "palette_gif": lambda: saved(Image.new("P", (5100, 5100), 3), "GIF"),
    "baseline_jpeg": lambda: saved(Image.new("RGB", (5700, 5700), (10, 20, 30)), "JPEG"),
    "progressive_jpeg": lambda: saved(Image.new("RGB", (4300, 4300), (10, 20, 30)), "JPEG", progressive=True),
    "webp": lambda: saved(Image.new("RGB", (2800, 2800), (10, 20, 30)), "WEBP"),
    "tiff_one_strip": lambda: saved(
        Image.new("RGB", (4300, 4300), (10, 20, 30)), "TIFF", compression="tiff_adobe_deflate", strip_size=1 << 40
    ),
}


def measured_peak_bytes(path: Path, fmt: str) -> int:
    """How far decoding `path` raises the peak RSS of a fresh Python process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, str(path), fmt], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
@pytest.mark.parametrize("kind", list(NEAR_LIMIT), ids=list(NEAR_LIMIT))
def test_an_image_accepted_near_the_limit_really_peaks_under_its_bound(kind: str, tmp_path: Path) -> None:
    data = NEAR_LIMIT[kind]()
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or ""
    bound = bound_of(data)
    assert 0.85 * MAX_DECODED_BYTES < bound <= MAX_DECODED_BYTES  # near the limit, accepted
    path = tmp_path / f"near.{fmt.lower()}"
    path.write_bytes(data)

    peak = measured_peak_bytes(path, fmt)

    assert peak <= bound, f"{kind}: {peak / MIB:.1f} MiB at peak, bound {bound / MIB:.1f} MiB"
    assert peak >= 0.7 * (bound - DECODER_SLACK_BYTES), f"{kind}: measured only {peak / MIB:.1f} MiB"


# 4. Accepted images convert exactly as before.


def converted_as_before(im: Image.Image) -> Image.Image:
    """The conversion `decode_reference` made before its peak was bounded: the oracle."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("P", "PA", "LA", "RGBA"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def _noise(mode: str) -> Image.Image:
    rgb = Image.effect_noise((67, 45), 64).convert("RGB")
    rgb = Image.merge("RGB", (rgb.getchannel(0), Image.linear_gradient("L").resize(rgb.size), rgb.getchannel(2)))
    alpha = Image.radial_gradient("L").resize(rgb.size)
    if mode == "RGBA":
        rgb.putalpha(alpha)
        return rgb
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), alpha))
    if mode == "I;16":
        return rgb.convert("L").point(lambda v: v * 251).convert("I").convert("I;16")
    return rgb.quantize(200) if mode == "P" else rgb.convert(mode)


AS_BEFORE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rgb_png": ("RGB", "PNG", {}),
    "palette_png": ("P", "PNG", {}),
    "palette_png_with_transparency": ("P", "PNG", {"transparency": 5}),
    "palette_gif_with_transparency": ("P", "GIF", {"transparency": 5}),
    "palette_bmp": ("P", "BMP", {}),
    "one_bit_png": ("1", "PNG", {}),
    "greyscale_png_with_transparent_grey": ("L", "PNG", {"transparency": 7}),
    "sixteen_bit_png": ("I;16", "PNG", {}),
    "la_png": ("LA", "PNG", {}),
    "rgba_png": ("RGBA", "PNG", {}),
    "rgba_webp": ("RGBA", "WEBP", {"lossless": True}),
    "cmyk_jpeg": ("CMYK", "JPEG", {}),
    "progressive_jpeg": ("RGB", "JPEG", {"progressive": True}),
}


@pytest.mark.parametrize("kind", list(AS_BEFORE), ids=list(AS_BEFORE))
def test_an_accepted_image_converts_to_the_same_rgb_pixels_as_before(kind: str) -> None:
    mode, fmt, params = AS_BEFORE[kind]
    data = saved(_noise(mode), fmt, **params)
    with Image.open(io.BytesIO(data)) as im:
        expected = converted_as_before(im)

    got = decode_reference(data)

    assert got.mode == "RGB" and got.size == expected.size
    assert got.tobytes() == expected.tobytes()
