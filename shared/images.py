"""Reference images: decode bytes safely into RGB, refusing what is not a usable image.

Used by the scheduler (at the edge) and the worker (again, before encoding), so both refuse
the same inputs with the same messages. 16-bit, CMYK, palette and alpha images are
converted to RGB, not refused.

Memory is bounded from the header, before a pixel is decoded: `peak_decode_bytes` counts
what decoding and every step of the RGB conversion hold at once, and `decode_reference`
refuses images whose peak exceeds `MAX_DECODED_BYTES`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Final

from PIL import Image, UnidentifiedImageError
from PIL.TiffImagePlugin import (
    BITSPERSAMPLE,
    PHOTOMETRIC_INTERPRETATION,
    ROWSPERSTRIP,
    SAMPLESPERPIXEL,
    TILELENGTH,
    TILEWIDTH,
)

from shared.errors import InvalidInput

MAX_REFERENCE_BYTES: Final = 50 * 1024 * 1024
MAX_REFERENCE_PIXELS: Final = 64 * 1024 * 1024  # beyond this, a decompression bomb
MIN_REFERENCE_SIDE_PX: Final = 8
# The most decoding one reference may hold at once (decoder, pixels and every conversion copy):
# a few KB of PNG can hold gigabytes of pixels. 128 MiB fits a 32 MP RGB photo (4 bytes per
# pixel: Pillow stores RGB as RGBX), a 16 MP RGBA or palette-with-transparency image, a 25 MP
# greyscale, 1-bit or opaque palette one, a 19 MP progressive 4:2:0 JPEG and an 8 MP WebP.
MAX_DECODED_BYTES: Final = 128 * 1024 * 1024
# Bytes per pixel as Pillow stores each mode in memory (RGB takes 4, as RGBX); others: 4.
MODE_BYTES_PER_PIXEL: Final = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
SIXTEEN_BIT_MODES: Final = ("I;16", "I;16B", "I;16L", "I")  # scaled to 8 bits, not clipped
ALPHA_MODES: Final = ("PA", "LA", "RGBA")
# What decoders hold besides the image they fill (measured with Pillow 13, libwebp 1.6 and
# libtiff 4.7: tests/shared/test_image_memory.py). libwebp fills an RGBA canvas, keeps a second
# one for the next frame and hands Pillow a bytes copy of it (4 bytes a pixel each); Pillow and
# libwebp each keep a copy of the file. Multi-scan JPEGs keep every DCT coefficient
# (`_jpeg_coefficient_bytes`); libtiff decodes one strip or tile into a buffer of its own.
WEBP_DECODER_BYTES_PER_PIXEL: Final = 12
WEBP_FILE_COPIES: Final = 2
# Line buffers, Python objects and the allocator's rounding: a few hundred KB measured.
DECODER_SLACK_BYTES: Final = 2 * 1024 * 1024
TIFF_PHOTOMETRIC_YCBCR: Final = 6  # libtiff decodes these to RGBA, 4 bytes a pixel
JPEG_COEFFICIENT_BYTES: Final = 2  # a DCT coefficient, as libjpeg keeps them for multi-scan JPEGs
FORMAT_EXTENSIONS: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}

# One step of the RGB conversion: the mode it makes, and how. Each step's input is freed
# once its output exists, so a step holds its input and its output at once, never more.
Step = tuple[str, Callable[[Image.Image], Image.Image]]


def sniff_format(data: bytes, *, field: str = "reference") -> str:
    """The file extension for an image's real format (not its name); refuses non-images."""
    if not data:
        raise InvalidInput(field, "<0 bytes>", "is an empty file; give a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_reference refuses those
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or ""
    except UnidentifiedImageError:
        # Never the bytes themselves: the file may be a secret that is not an image.
        shown = f"<{len(data)} bytes>"
        raise InvalidInput(field, shown, "is not an image PIL can read; give a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError as e:
        # Pillow refuses headers beyond twice its pixel limit in open() itself.
        raise InvalidInput(field, str(e)[:60], "looks like a decompression bomb; use a smaller image") from None
    except Exception as e:  # hostile headers make Pillow raise many kinds of errors
        raise InvalidInput(field, str(e)[:60], "cannot be decoded (truncated or corrupt?); re-export it") from None
    if fmt not in FORMAT_EXTENSIONS:
        raise InvalidInput(field, fmt, f"image format not supported; use one of {sorted(FORMAT_EXTENSIONS)}")
    return FORMAT_EXTENSIONS[fmt]


def decode_reference(data: bytes, *, field: str = "reference") -> Image.Image:
    """Decode image bytes fully into an RGB image, or raise `InvalidInput` naming `field`.

    Holds at most `MAX_DECODED_BYTES` at once (`peak_decode_bytes`), besides `data` itself.
    """
    # 1. Bytes and format.
    if len(data) > MAX_REFERENCE_BYTES:
        raise InvalidInput(field, f"<{len(data)} bytes>", f"is larger than {MAX_REFERENCE_BYTES} bytes")
    sniff_format(data, field=field)
    try:
        # 2. Pixels, once the header shows that decoding and converting them fit.
        image = _decode_checked(data, field=field)
        # 3. RGB, freeing each copy as soon as the next one exists.
        return _to_rgb(image)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, str(e)[:60], "looks like a decompression bomb; use a smaller image") from None
    except Exception as e:  # OSError, SyntaxError, struct.error, EOFError...: hostile or broken data
        raise InvalidInput(field, str(e)[:60], "cannot be decoded (truncated or corrupt?); re-export it") from None


def decoded_bytes(im: Image.Image) -> int:
    """How many bytes `im`'s pixels take once decoded, from its header alone (size and mode)."""
    return _mode_bytes(im.mode, im.size)


def peak_decode_bytes(im: Image.Image, data: bytes) -> int:
    """The most bytes `decode_reference` holds at once for `data`, opened (not loaded) as `im`.

    From the headers alone: the decoder's own buffers with the pixels they fill, then every
    conversion step (input and output alive together) down to the final RGB image.
    """
    decoding = decoded_bytes(im) + _decoder_bytes(im, data)
    return max(decoding, _conversion_bytes(im)) + DECODER_SLACK_BYTES


def _mode_bytes(mode: str, size: tuple[int, int]) -> int:
    """How many bytes Pillow stores an image of `mode` and `size` in."""
    width, height = size
    return width * height * MODE_BYTES_PER_PIXEL.get(mode, 4)


def _decoder_bytes(im: Image.Image, data: bytes) -> int:
    """What `im`'s decoder holds besides the image it fills (PNG, GIF, BMP: a few rows)."""
    width, height = im.size
    if im.format == "JPEG":
        return 0 if _jpeg_decodes_by_rows(im, data) else _jpeg_coefficient_bytes(im)
    if im.format == "WEBP":
        return width * height * WEBP_DECODER_BYTES_PER_PIXEL + len(data) * WEBP_FILE_COPIES
    if im.format == "TIFF":
        return _tiff_block_bytes(im)
    return 0


def _jpeg_decodes_by_rows(im: Image.Image, data: bytes) -> bool:
    """Whether libjpeg can decode `data` a few rows at a time: one scan holding every component.

    Progressive JPEGs, and baseline ones whose first scan lacks a component, have several
    scans: libjpeg then keeps every DCT coefficient of the image until the last one.
    """
    if im.info.get("progressive"):
        return False
    pos = 2  # after SOI
    while pos + 4 < len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xDA:  # start of scan: its component count comes first
            return data[pos + 4] == len(getattr(im, "layer", None) or im.getbands())
        else:
            pos += 2 + length
    return False


def _jpeg_coefficient_bytes(im: Image.Image) -> int:
    """The DCT coefficients libjpeg keeps for a whole multi-scan JPEG."""
    # Each layer is (component id, horizontal sampling, vertical sampling, quantisation table).
    layers: list[tuple[int, int, int, int]] = getattr(im, "layer", None) or [(0, 1, 1, 0)] * len(im.getbands())
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    # libjpeg pads the image to whole MCUs (8 pixels times the largest sampling factor).
    width = math.ceil(im.size[0] / (8 * h_max)) * 8 * h_max
    height = math.ceil(im.size[1] / (8 * v_max)) * 8 * v_max
    samples = sum(width * height * h * v // (h_max * v_max) for _, h, v, _ in layers)
    return samples * JPEG_COEFFICIENT_BYTES


def _tiff_block_bytes(im: Image.Image) -> int:
    """The strip or tile that Pillow has libtiff decode into a buffer, from the TIFF tags."""
    tags: Mapping[int, Any] = getattr(im, "tag_v2", {})
    width, height = im.size
    bits = tags.get(BITSPERSAMPLE, 8)
    bits_per_pixel = int(max(bits) if isinstance(bits, tuple) else bits) * int(tags.get(SAMPLESPERPIXEL, 1))
    if tags.get(PHOTOMETRIC_INTERPRETATION) == TIFF_PHOTOMETRIC_YCBCR:
        bits_per_pixel = max(bits_per_pixel, 32)
    if TILEWIDTH in tags:
        block_width, rows = int(tags[TILEWIDTH]), int(tags.get(TILELENGTH, height))
    else:  # one strip may be the whole image
        block_width, rows = width, min(int(tags.get(ROWSPERSTRIP, height)), height)
    return rows * ((block_width * bits_per_pixel + 7) // 8)


def _conversion_bytes(im: Image.Image) -> int:
    """The most that any step of `_to_rgb` holds at once: its input and its output."""
    peak = held = decoded_bytes(im)
    for mode, _ in _steps(im.mode, has_alpha=_has_alpha(im)):
        made = _mode_bytes(mode, im.size)
        peak = max(peak, held + made)
        held = made
    return peak


def _check_decoded_size(im: Image.Image, data: bytes, *, field: str) -> None:
    """Refuse `im` if its size, or what decoding it would hold at peak, is beyond the limits."""
    # Checked on the header, before a byte is decoded: an 8192 x 8192 palette PNG of a few KB
    # held 640 MiB on its way to RGB when only its 1 byte a pixel was counted.
    w, h = im.size
    if w * h > MAX_REFERENCE_PIXELS:
        raise InvalidInput(field, f"{w}x{h}", f"has more than {MAX_REFERENCE_PIXELS} pixels")
    if min(w, h) < MIN_REFERENCE_SIDE_PX:
        raise InvalidInput(field, f"{w}x{h}", f"sides must be >= {MIN_REFERENCE_SIDE_PX} px")
    peak = peak_decode_bytes(im, data)
    if peak > MAX_DECODED_BYTES:
        mib = MAX_DECODED_BYTES // (1024 * 1024)
        found = f"{w}x{h} {im.mode}, {math.ceil(peak / (1024 * 1024))} MiB at peak"
        fix = f"would take more than {mib} MiB once decoded and converted to RGB; use a smaller image"
        raise InvalidInput(field, found, fix)


def _decode_checked(data: bytes, *, field: str) -> Image.Image:
    """`data`'s pixels as stored (any mode), let go of the file and its decoder."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            _check_decoded_size(im, data, field=field)
            im.load()  # a truncated file fails here, not later inside the encoder
            # The same pixels without copying them (`_new` is what Pillow's copy() and
            # convert() return through): a plain image that keeps no file, no decoder
            # (libwebp's canvas) and no copy of the file's bytes alive.
            pixels = im._new(im.im)
            im.close()
    _check_decoded_size(pixels, data, field=field)  # the conversion follows the loaded mode and info
    return pixels


def _has_alpha(im: Image.Image) -> bool:
    """Whether `im` has transparency to flatten onto white."""
    return im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def _steps(mode: str, *, has_alpha: bool) -> list[Step]:
    """The conversion steps from `mode` to RGB; `_conversion_bytes` counts these same steps."""
    if mode in SIXTEEN_BIT_MODES:
        # 16-bit greyscale: scale to 8 bits instead of clipping to white (point keeps the mode).
        return [(mode, _scaled_to_8_bits), ("L", _converted("L")), ("RGB", _converted("RGB"))]
    if has_alpha:
        to_rgba = [] if mode == "RGBA" else [("RGBA", _converted("RGBA"))]
        return [*to_rgba, ("RGB", _on_white)]
    if mode == "RGB":
        return []  # already RGB: no copy
    return [("RGB", _converted("RGB"))]  # opaque palette, 1-bit, greyscale, CMYK...: one copy


def _to_rgb(im: Image.Image) -> Image.Image:
    """`im` as RGB; closes `im` and every intermediate as soon as the next one is made."""
    for _, step in _steps(im.mode, has_alpha=_has_alpha(im)):
        made = step(im)
        im.close()  # frees its pixels
        im = made
    return im


def _scaled_to_8_bits(im: Image.Image) -> Image.Image:
    """16- or 32-bit greyscale divided by 256, in the same mode."""
    return im.point(lambda v: v / 256)


def _converted(mode: str) -> Callable[[Image.Image], Image.Image]:
    """A step that converts its image to `mode`."""
    return lambda im: im.convert(mode)


def _on_white(im: Image.Image) -> Image.Image:
    """RGBA `im` pasted onto white through its alpha: one RGB image, no alpha band copied out."""
    background = Image.new("RGB", im.size, (255, 255, 255))
    background.paste(im, mask=im)  # an RGBA mask is read through its alpha band
    return background
