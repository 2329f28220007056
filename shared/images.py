"""Reference images: decode bytes safely into RGB, refusing what is not a usable image.

Used by the scheduler (at the edge) and the worker (again, before encoding), so both refuse
the same inputs with the same messages. 16-bit, CMYK, palette and alpha images are
converted to RGB, not refused.
"""

from __future__ import annotations

import io
import warnings
from typing import Final

from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidInput

MAX_REFERENCE_BYTES: Final = 50 * 1024 * 1024
MAX_REFERENCE_PIXELS: Final = 64 * 1024 * 1024  # beyond this, a decompression bomb
MIN_REFERENCE_SIDE_PX: Final = 8
# What decoding may allocate: a few hundred KB of PNG can hold gigabytes of pixels, and the
# RGB conversion needs about as much again. 128 MiB fits a 32 MP RGBA or 24 MP RGB photo.
MAX_DECODED_BYTES: Final = 128 * 1024 * 1024
# Bytes per pixel as Pillow stores each mode in memory (RGB takes 4, as RGBX); others: 4.
MODE_BYTES_PER_PIXEL: Final = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
FORMAT_EXTENSIONS: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}


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
    """Decode image bytes fully into an RGB image, or raise `InvalidInput` naming `field`."""
    if len(data) > MAX_REFERENCE_BYTES:
        raise InvalidInput(field, f"<{len(data)} bytes>", f"is larger than {MAX_REFERENCE_BYTES} bytes")
    sniff_format(data, field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_decoded_size(im, field=field)
                im.load()  # a truncated file fails here, not later inside the encoder
                return _to_rgb(im)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, str(e)[:60], "looks like a decompression bomb; use a smaller image") from None
    except Exception as e:  # OSError, SyntaxError, struct.error, EOFError...: hostile or broken data
        raise InvalidInput(field, str(e)[:60], "cannot be decoded (truncated or corrupt?); re-export it") from None


def decoded_bytes(im: Image.Image) -> int:
    """How many bytes `im` takes once decoded, from its header alone (size and mode)."""
    width, height = im.size
    return width * height * MODE_BYTES_PER_PIXEL.get(im.mode, 4)


def _check_decoded_size(im: Image.Image, *, field: str) -> None:
    # Checked on the header, before a byte is decoded: the pixel count alone lets a
    # 255 KB RGBA PNG allocate a gigabyte.
    w, h = im.size
    if w * h > MAX_REFERENCE_PIXELS:
        raise InvalidInput(field, f"{w}x{h}", f"has more than {MAX_REFERENCE_PIXELS} pixels")
    size_bytes = decoded_bytes(im)
    if size_bytes > MAX_DECODED_BYTES:
        mib = MAX_DECODED_BYTES // (1024 * 1024)
        found = f"{w}x{h} {im.mode}, {size_bytes // (1024 * 1024)} MiB decoded"
        raise InvalidInput(field, found, f"would take more than {mib} MiB once decoded; use a smaller image")


def _to_rgb(im: Image.Image) -> Image.Image:
    if min(im.size) < MIN_REFERENCE_SIDE_PX:
        raise InvalidInput("reference", f"{im.size[0]}x{im.size[1]}", f"sides must be >= {MIN_REFERENCE_SIDE_PX} px")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping to white.
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("P", "PA", "LA", "RGBA"):
        # Pasted onto white through the alpha channel: one RGB copy and one alpha band,
        # not the three full RGBA copies that alpha_composite needs.
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")
