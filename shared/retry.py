"""Retrying transient faults (Redis, S3, SQL unreachable) with exponential backoff and jitter.

Permanent errors are never retried: a bad image stays bad.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from shared.errors import TransientError

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """Exponential backoff with "equal jitter": half the cap fixed, half random.

    The fixed half gives the retries a known minimum total span (a 20 s S3 outage must
    not exhaust them); the random half keeps a fleet of workers from retrying in step.
    """
    cap_s = min(max_s, base_s * 2.0**attempt)
    return cap_s / 2 + random.uniform(0.0, cap_s / 2)


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    retries: int,
    base_s: float,
    max_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`; on `TransientError` wait and try again, at most `retries` more times."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except TransientError as e:
            if attempt == retries:
                raise
            delay_s = backoff_s(attempt, base_s=base_s, max_s=max_s)
            log.warning("%s failed (%s); retry %d/%d in %.2f s", what, e, attempt + 1, retries, delay_s)
            sleep(delay_s)
    raise AssertionError("unreachable")


def retry_per_settings(fn: Callable[[], T], *, what: str, settings: Settings) -> T:
    """`retry_transient` with the budget of the IPAB_TRANSIENT_RETRIES and IPAB_RETRY_* settings."""
    return retry_transient(
        fn, what=what, retries=settings.transient_retries, base_s=settings.retry_base_s, max_s=settings.retry_max_s
    )


def retry_span_s(settings: Settings) -> float:
    """The longest `retry_per_settings` waits between tries, in all (each backoff at its cap)."""
    return sum(
        min(settings.retry_max_s, settings.retry_base_s * 2.0**attempt) for attempt in range(settings.transient_retries)
    )
