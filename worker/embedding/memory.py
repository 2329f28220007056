"""The in-process level: an LRU of tensors bounded by their total size in bytes.

`cachetools.LRUCache` does the bookkeeping (its `getsizeof` makes `maxsize` a byte bound);
it is not thread-safe, so one lock guards every call.
"""

from __future__ import annotations

import threading

import torch
from cachetools import LRUCache


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The size of a tensor's data in bytes."""
    return tensor.numel() * tensor.element_size()


class ByteLru:
    """In-process LRU of tensors bounded by their total size in bytes; safe across threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: LRUCache[str, torch.Tensor] = LRUCache(maxsize=max_bytes, getsizeof=tensor_bytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """The bytes of all tensors kept."""
        with self._lock:
            return int(self._entries.currsize)

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor under `key` (now the most recently used), or None."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Keep `tensor`, evicting the least recently used until the bound holds; too big: not kept."""
        with self._lock:
            self._entries.pop(key, None)  # a replaced entry goes even when its successor is too big
            if tensor_bytes(tensor) <= self.max_bytes:
                self._entries[key] = tensor

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()


def private_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy the caller owns (an in-place change must not reach the LRU's), made by one memcpy on this thread.

    Not `clone()`: torch copies a 658 KB plus entry in parallel, and waking its idle thread
    pool costs milliseconds on a busy machine (measured: 4-16 ms p50 for an LRU hit).
    """
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    return torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)
