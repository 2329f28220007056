"""The image encoder as the embedding cache sees it: what it is, and building it only when needed.

`EncoderIdentity` is what every entry is keyed and checked by besides the image (encoder,
kind, dtype); `LazyEncoder` builds the encoder on the first full miss and checks what it
returns before anything is cached.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import torch
from PIL import Image

from shared.errors import InvalidInput, ModelSetError

EMBED_RANKS: Final = {"image_embeds": 1, "hidden_states": 2}  # plain: (D,); plus: (tokens, hidden)
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@runtime_checkable
class Encoder(Protocol):
    """The image encoder the cache runs on a miss; `worker.pipeline.Renderer` is one."""

    @property
    def encoder_id(self) -> str:
        """Identity of the image encoder (a hash of its weights or config), stable across processes."""
        ...

    @property
    def embed_kind(self) -> str:
        """What `encode` returns: `image_embeds` (plain adapters) or `hidden_states` (plus)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tensors `encode` returns."""
        ...

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One CPU tensor per image: `(D,)` for image_embeds, `(tokens, hidden)` for hidden_states."""
        ...


@dataclass(frozen=True)
class EncoderIdentity:
    """What an embedding is keyed by besides the image: encoder, kind and dtype (and, if known, shape)."""

    encoder_id: str
    embed_kind: str
    dtype: torch.dtype
    embed_shape: tuple[int, ...] | None = None  # when the encoder knows it without loading weights

    def __post_init__(self) -> None:
        if self.embed_kind not in EMBED_RANKS:
            raise InvalidInput("embed_kind", self.embed_kind, f"must be one of {sorted(EMBED_RANKS)}")
        if not self.encoder_id:
            raise InvalidInput("encoder_id", self.encoder_id, "must identify the image encoder (not empty)")

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderIdentity:
        """The identity an encoder announces (`embed_shape` is read when the encoder has one)."""
        shape = getattr(encoder, "embed_shape", None)
        return cls(encoder.encoder_id, encoder.embed_kind, encoder.dtype, tuple(shape) if shape else None)

    @property
    def dtype_name(self) -> str:
        """`float16`, `bfloat16`, ..."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def token(self) -> str:
        """Path- and key-safe name of this identity: `<kind>-<dtype>-<encoder id or its hash>`."""
        encoder = self.encoder_id
        if not _SAFE_TOKEN.fullmatch(encoder):
            encoder = hashlib.sha256(encoder.encode()).hexdigest()[:32]
        return f"{self.embed_kind}-{self.dtype_name}-{encoder}"

    def matches(self, other: EncoderIdentity) -> bool:
        """Whether two identities key the same entries (shape is not part of the key)."""
        return (self.encoder_id, self.embed_kind, self.dtype) == (other.encoder_id, other.embed_kind, other.dtype)


class LazyEncoder:
    """An encoder, or a zero-argument factory of one called on first use, with the identity keys use.

    A factory needs `identity` (what the encoder will be), because the keys are built from it
    before the encoder exists; a built encoder that turns out to be another one is refused.
    """

    def __init__(self, encoder: Encoder | Callable[[], Encoder], identity: EncoderIdentity | None) -> None:
        self._encoder: Encoder | None = None
        self._factory: Callable[[], Encoder] | None = None
        if not isinstance(encoder, Encoder):
            if identity is None:
                raise InvalidInput("identity", None, "is needed when the encoder is a factory (the keys depend on it)")
            self._factory, self.identity = encoder, identity
            return
        own = EncoderIdentity.of(encoder)
        if identity is not None and not identity.matches(own):
            raise InvalidInput("identity", identity, f"differs from the encoder's own {own}; leave it out")
        self._encoder, self.identity = encoder, identity or own

    @property
    def loaded(self) -> bool:
        """Whether the encoder has been built."""
        return self._encoder is not None

    def load(self) -> Encoder:
        """The encoder, built now if it was a factory; `ModelSetError` if it is not the one announced."""
        if self._encoder is None:
            assert self._factory is not None
            encoder = self._factory()
            if not EncoderIdentity.of(encoder).matches(self.identity):
                raise ModelSetError(
                    f"the encoder factory built {EncoderIdentity.of(encoder)}, but the cache is keyed by "
                    f"{self.identity}; pass the identity of the encoder the factory builds"
                )
            self._encoder = encoder
        return self._encoder

    def checked(self, outputs: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
        """`outputs` as contiguous CPU tensors of the identity's dtype; `ModelSetError` on a wrong count or rank."""
        if len(outputs) != count:
            raise ModelSetError(f"the image encoder returned {len(outputs)} embeddings for {count} images")
        tensors = [t.detach().to("cpu", self.identity.dtype).contiguous() for t in outputs]
        rank = EMBED_RANKS[self.identity.embed_kind]
        for tensor in tensors:
            if tensor.dim() != rank:
                raise ModelSetError(
                    f"the image encoder returned shape {tuple(tensor.shape)} for {self.identity.embed_kind}"
                )
        return tensors
