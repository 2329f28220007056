"""What every format's writer does: take samples one at a time; sharded formats roll files at a size.

A writer is a context manager: when the block ends with an error, the file being written
is discarded (never left half-written under its final name).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import ExitStack
from types import TracebackType
from typing import IO, Final

from scheduler.export.destination import Destination
from scheduler.export.samples import Sample
from scheduler.export.state import ExportState
from shared.errors import InvalidInput

DEFAULT_SHARD_SIZE_BYTES: Final = 1_000_000_000  # 1 GB
_SIZE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size_bytes(text: str) -> int:
    """`1GB`, `500MB`, `2GiB` or a number of bytes as bytes; `InvalidInput` naming --shard-size otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidInput("--shard-size", text, "must be a size such as 1GB, 500MB, 2GiB or a number of bytes")
    unit = (match.group(2) or "").lower()
    base = 1024 ** "bkmgt".index(unit[0]) if "i" in unit else _UNITS[unit[:1]]
    size = int(float(match.group(1)) * base)
    if size < 1:
        raise InvalidInput("--shard-size", text, "must be at least one byte")
    return size


class Writer(ABC):
    """Writes the samples of one export run into a destination; `close` finishes the last file."""

    def __init__(self, dest: Destination, state: ExportState, *, shard_size_bytes: int) -> None:
        self.dest = dest
        self.state = state
        self.shard_size_bytes = shard_size_bytes

    @abstractmethod
    def add(self, sample: Sample) -> None:
        """Write one sample."""

    @abstractmethod
    def close(self) -> None:
        """Finish what is open."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what is half-written."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None:
            self.close()
        else:
            self.abort()


class ShardedWriter(Writer):
    """Numbered files (`name_pattern.format(n)`) of at most `shard_size_bytes` (a bigger sample gets its own).

    Each run starts a new file after the last one, so earlier files are never rewritten.
    """

    name_pattern: str = "shard-{:06d}"

    def __init__(self, dest: Destination, state: ExportState, *, shard_size_bytes: int) -> None:
        super().__init__(dest, state, shard_size_bytes=shard_size_bytes)
        self._stack: ExitStack | None = None
        self._shard_bytes = 0

    @abstractmethod
    def sample_bytes(self, sample: Sample) -> int:
        """What the sample adds to its file, in bytes (an estimate is enough)."""

    @abstractmethod
    def begin(self, out: IO[bytes]) -> None:
        """Start a file on `out`."""

    @abstractmethod
    def write(self, sample: Sample) -> None:
        """Append the sample to the open file."""

    @abstractmethod
    def end(self) -> None:
        """Finish the open file (its stream is closed after)."""

    def add(self, sample: Sample) -> None:
        """Write the sample, starting a new file first when it would not fit in this one."""
        size = self.sample_bytes(sample)
        if self._stack is not None and self._shard_bytes and self._shard_bytes + size > self.shard_size_bytes:
            self.close()
        if self._stack is None:
            self._stack = ExitStack()
            self.begin(self._stack.enter_context(self.dest.open_write(self.name_pattern.format(self.state.next_shard))))
            self.state.next_shard += 1
            self._shard_bytes = 0
        self.write(sample)
        self._shard_bytes += size

    def close(self) -> None:
        """Finish the open file and let it appear under its name."""
        if self._stack is not None:
            self.end()
            stack, self._stack = self._stack, None
            stack.close()

    def abort(self) -> None:
        """Discard the open file (its temporary is removed, nothing is uploaded)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(RuntimeError, RuntimeError("export aborted"), None)
