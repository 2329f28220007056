"""The entry format: one embedding as safetensors bytes whose header says what they hold.

The header names the image sha256, encoder, kind, dtype, shape and a CRC-32 of the tensor
bytes; `unpack_entry` refuses bytes that are not the entry asked for. The same bytes go to
Redis and, as the durable copy, to object storage.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Final

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.errors import ModelSetError
from worker.embedding.encoder import EMBED_RANKS, EncoderIdentity

ENTRY_FORMAT: Final = "ipab-embedding-1"
TENSOR_NAME: Final = "embedding"
CONTENT_TYPE: Final = "application/octet-stream"


class CorruptEntry(Exception):
    """Raised when cached bytes are not a valid entry for the image and encoder asked for."""


def pack_entry(tensor: torch.Tensor, *, sha256: str, identity: EncoderIdentity) -> bytes:
    """Serialize one embedding as safetensors bytes that say what they hold."""
    tensor = tensor.contiguous()
    metadata = {
        "format": ENTRY_FORMAT,
        "sha256": sha256,
        "encoder": identity.encoder_id,
        "kind": identity.embed_kind,
        "dtype": identity.dtype_name,
        "shape": shape_text(tensor.shape),
        "crc32": _crc32(tensor),
    }
    return save_safetensors({TENSOR_NAME: tensor}, metadata=metadata)


def unpack_entry(data: bytes, *, sha256: str, identity: EncoderIdentity) -> torch.Tensor:
    """The embedding in `data`, or `CorruptEntry` saying why it is not the one asked for."""
    metadata = _read_metadata(data)
    wanted = {
        "format": ENTRY_FORMAT,
        "sha256": sha256,
        "encoder": identity.encoder_id,
        "kind": identity.embed_kind,
        "dtype": identity.dtype_name,
    }
    for name, want in wanted.items():
        if metadata.get(name) != want:
            raise CorruptEntry(f"metadata {name} is {metadata.get(name)!r}, expected {want!r}")
    try:
        tensor = load_safetensors(data)[TENSOR_NAME]
    except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise CorruptEntry(f"unreadable safetensors: {e}") from None
    _check_tensor(tensor, metadata, identity)
    return tensor


def shape_text(shape: Sequence[int]) -> str:
    """A shape as the header writes it: `257x1280`."""
    return "x".join(str(n) for n in shape)


class LearnedShape:
    """The embedding shape of this process's encoder: the one check an entry's header cannot answer alone.

    It lives with the entry format because it is the last test an entry must pass before it is
    used. Announced by the encoder (`embed_shape`), it is trusted from the start; otherwise the
    first entry read sets it provisionally, and the first encode in this process settles it.
    """

    def __init__(self, announced: tuple[int, ...] | None) -> None:
        self.shape = announced
        self._trusted = announced is not None

    def check(self, shape: tuple[int, ...]) -> None:
        """Accept an entry's shape (learning it provisionally if none is known); `CorruptEntry` if it differs."""
        if self.shape is None:
            self.shape = shape  # provisional until this process encodes
        elif shape != self.shape:
            raise CorruptEntry(f"shape {shape} differs from this encoder's {self.shape}")

    def learn(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Take the encoder's output shape as the truth; the provisional shape it replaced, if that was wrong.

        Raises `ModelSetError` when the encoder contradicts a shape it announced or gave before.
        """
        wrong = self.shape if self.shape is not None and shape != self.shape else None
        if wrong is not None and self._trusted:
            raise ModelSetError(f"the image encoder returned shape {shape}, where it announced or gave {self.shape}")
        self.shape, self._trusted = shape, True
        return wrong


def _check_tensor(tensor: torch.Tensor, metadata: Mapping[str, str], identity: EncoderIdentity) -> None:
    if tensor.dtype != identity.dtype:
        raise CorruptEntry(f"dtype is {tensor.dtype}, expected {identity.dtype}")
    if tensor.dim() != EMBED_RANKS[identity.embed_kind]:
        raise CorruptEntry(f"shape {tuple(tensor.shape)} has the wrong rank for {identity.embed_kind}")
    if shape_text(tensor.shape) != metadata.get("shape"):
        raise CorruptEntry(f"shape {tuple(tensor.shape)} differs from metadata shape {metadata.get('shape')!r}")
    if _crc32(tensor) != metadata.get("crc32"):
        raise CorruptEntry("CRC-32 mismatch (the tensor bytes changed)")


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptEntry(f"{len(data)} bytes, shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptEntry(f"header length {header_len} runs past the end ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:
        raise CorruptEntry("header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CorruptEntry("no metadata in the header")
    return {str(k): str(v) for k, v in metadata.items()}


def _crc32(tensor: torch.Tensor) -> str:
    # Against accidental damage (bit flips, bad writes), not forgery: whoever can write Redis
    # can write a well-formed entry. CRC-32 is ~6x faster than blake2b on a 658 KB plus entry.
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw.data):08x}"
