"""The whole error tree of ipab, split by what the caller should do next.

`PermanentError`: retrying cannot help (bad input, bad weights); fail the job at once.
`TransientError`: a service is unreachable; retry with backoff, bounded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

# How many problems an error lists: past it they are counted, not listed, so that the answer
# to a file of a million bad rows stays a screenful (and the error itself stays small).
MAX_LISTED_PROBLEMS: Final = 100


class IpabError(Exception):
    """Raised for every error that ipab itself reports; the base of the tree."""


class PermanentError(IpabError):
    """Raised when retrying cannot help: the job fails at once with this reason."""


class TransientError(IpabError):
    """Raised when a service (Redis, S3, SQL) is unreachable; the caller retries with backoff."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class InvalidInput(PermanentError):
    """Raised when one input value is not allowed: names the field, shows the value, says what is."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"`{field}` is {_show(value)}: {allowed}")


class ManifestInvalid(PermanentError):
    """Raised when manifest rows are invalid; carries every (line, field, reason) found.

    `stopped_after`: reading stopped after this line, at MAX_LISTED_PROBLEMS problems; the
    lines after it were not checked (None: every line was).
    """

    def __init__(self, problems: list[tuple[int, str, str]], *, stopped_after: int | None = None) -> None:
        self.problems = problems
        self.stopped_after = stopped_after
        lines = [f"line {line}: {field}: {reason}" for line, field, reason in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        if stopped_after is not None:
            lines.append(f"the lines after line {stopped_after} were not checked")
        super().__init__(f"{len(problems)} invalid row(s):\n" + "\n".join(lines))


class TooManyRows(InvalidInput):
    """Raised when a manifest or batch holds more than `limit` rows; the rows past the limit are never read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__("rows", f"more than {limit}", f"at most {limit} rows per batch; split it into several")


class ModelSetError(PermanentError):
    """Raised when a model set cannot be read or loaded (missing file, wrong layout)."""


class IncompatibleEncoder(ModelSetError):
    """Raised when an IP-Adapter is paired with an image encoder of the wrong width."""


class UnsafeWeights(ModelSetError):
    """Raised when a `.bin` weights file holds anything but tensors; it is never executed."""


class SettingsError(IpabError):
    """Raised at start-up when an `IPAB_*` setting is invalid; names the variable."""


class JobCanceled(IpabError):
    """Raised inside a running job when its cancellation is noticed (at a denoising step)."""


class JobTimedOut(PermanentError):
    """Raised when a job runs past IPAB_SOFT_TIME_LIMIT_S; it fails instead of holding its GPU."""


class GpuOutOfMemory(PermanentError):
    """Raised when the device runs out of memory for one job; the job fails, the worker serves on."""


class StorageUnavailable(TransientError):
    """Raised when the S3-compatible object store cannot be reached."""


class QueueUnavailable(TransientError):
    """Raised when Redis cannot be reached."""


class DatabaseUnavailable(TransientError):
    """Raised when the SQL database cannot be reached."""


class MessageInvalid(PermanentError):
    """Raised when a queue message cannot be decoded into a job (poison message)."""


class ObjectMissing(PermanentError):
    """Raised when an object that should exist is not in the object store (names the URI)."""


class ObjectTooLarge(PermanentError):
    """Raised when an object is larger than its reader allows (found by HEAD, before reading it)."""

    def __init__(self, uri: str, *, size_bytes: int, max_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes
        super().__init__(f"{uri} holds {size_bytes} bytes, more than the {max_bytes} allowed")


class CapReached(IpabError):
    """Raised when what a tenant adds would pass one of its caps (`scheduler.batches.limits`);
    nothing was added: retry once some of what it holds is gone (its queued jobs have run)."""

    def __init__(
        self, *, tenant: str, cap: str, setting: str, held: int, adding: int, maximum: int, lines: tuple[int, ...] = ()
    ) -> None:
        self.tenant, self.cap, self.setting = tenant, cap, setting
        self.held, self.adding, self.maximum = held, adding, maximum
        self.lines = lines  # the rows refused, when the others were admitted (a group of requests)
        super().__init__(
            f"tenant {tenant!r} has {held} {cap}; adding {adding} would pass the cap of {maximum} ({setting}); "
            "retry when some have run"
        )


class QuotaExceeded(IpabError):
    """Raised when a submission would pass a tenant's quota; nothing of it is written.

    Names the quota (`images_per_day`, `images_per_month`, `gpu_s_per_day`, `gpu_s_per_month`),
    its limit, what is used (images: made in the window, plus jobs queued or running), what
    the submission asked for, and when the window resets (naive UTC).
    """

    def __init__(
        self,
        *,
        tenant: str,
        quota: str,
        limit: float,
        used: float,
        requested: int,
        resets_at: datetime,
        lines: tuple[int, ...] = (),
    ) -> None:
        self.tenant = tenant
        self.quota = quota
        self.limit = limit
        self.used = used
        self.requested = requested
        self.resets_at = resets_at
        self.lines = lines  # the rows refused, each a request of its own, when the others were admitted
        unit = "GPU-seconds" if quota.startswith("gpu_s") else "images"
        super().__init__(
            f"tenant {tenant!r} is at its quota {quota} = {limit:g} {unit}: {used:g} used, {requested} more asked; "
            f"it resets at {resets_at.isoformat()}Z (`ipab usage --tenant {tenant}` shows the usage; "
            "the operator raises the quota with `ipab quotas set`)"
        )


class NotFound(IpabError):
    """Raised when a batch or job is not there for the caller (absent, or another tenant's: worded alike)."""

    def __init__(self, kind: str, ref: str) -> None:
        self.kind = kind
        self.ref = ref
        super().__init__(f"no {kind} has the name or id {ref!r}")

    def __reduce__(self) -> tuple[type[NotFound], tuple[str, str]]:
        return (NotFound, (self.kind, self.ref))  # pickled whole: raised in a batch process, answered in the API's
