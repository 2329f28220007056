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
        head = data[:16]
        raise InvalidInput(field, head, "is not an image PIL can read; give a PNG, JPEG or WebP image") from None
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
                w, h = im.size
                if w * h > MAX_REFERENCE_PIXELS:
                    raise InvalidInput(field, f"{w}x{h}", f"has more than {MAX_REFERENCE_PIXELS} pixels")
                im.load()  # a truncated file fails here, not later inside the encoder
                return _to_rgb(im)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, str(e)[:60], "looks like a decompression bomb; use a smaller image") from None
    except Exception as e:  # OSError, SyntaxError, struct.error, EOFError...: hostile or broken data
        raise InvalidInput(field, str(e)[:60], "cannot be decoded (truncated or corrupt?); re-export it") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if min(im.size) < MIN_REFERENCE_SIDE_PX:
        raise InvalidInput("reference", f"{im.size[0]}x{im.size[1]}", f"sides must be >= {MIN_REFERENCE_SIDE_PX} px")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping to white.
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("P", "PA", "LA", "RGBA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")
