"""Credentials never leave the process: masking passwords in URLs before anything prints them.

`mask_url` masks one URL (`redis://:s3cret@host` -> `redis://:***@host`); `mask_text`
masks every URL inside free text (an error message, a log line), so a URL quoted by a
library's own exception is masked too. `MaskingFormatter` applies `mask_text` to every log
line, and the CLI applies it to every error it prints.
"""

from __future__ import annotations

import logging
import re
from typing import Final

MASK: Final = "***"
# scheme://user:password@ (user may be empty, as in redis://:password@host). The password
# runs to the last `@` before the host: passwords may hold `@` when not percent-encoded.
_USERINFO: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)(?P<password>[^\s/'\"]*)@")
# Query parameters that carry secrets (`?password=...`, presigned `X-Amz-Signature=...`).
_SECRET_PARAMS: Final = re.compile(
    r"(?P<head>[?&](?:password|passwd|secret|token|access_key|secret_key|X-Amz-Signature|X-Amz-Credential)=)"
    r"(?P<value>[^&\s'\"]*)",
    re.IGNORECASE,
)


def mask_text(text: str) -> str:
    """`text` with the password of every URL in it (and secret query parameters) replaced by ***."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@" if m["password"] else m[0], text)
    return _SECRET_PARAMS.sub(lambda m: f"{m['head']}{MASK}", masked)


def mask_url(url: str | None) -> str:
    """One URL for display with its password masked; None (an unset URL) shows as `(unset)`."""
    return "(unset)" if url is None else mask_text(url)


class MaskingFormatter(logging.Formatter):
    """A log formatter that masks credentials in every formatted line (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record formatted as usual, then masked."""
        return mask_text(super().format(record))
