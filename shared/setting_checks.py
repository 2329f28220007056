"""Checks of single setting values (URLs, bucket names, lists, durations), used by `shared.settings`.

Each check returns the value (possibly normalized) or raises `ValueError` saying what is
wrong and what is allowed; `load_settings` adds the variable's name and its (masked) value.
Nothing here connects to a service: an unreachable one is found at first use.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from shared.errors import InvalidInput
from shared.retention import FOREVER, parse_duration

SQL_BACKENDS: Final = ("sqlite", "postgresql")
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
S3_SCHEMES: Final = ("http", "https")
DEVICE_PATTERN: Final = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
_BUCKET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_LIST_SEPARATORS: Final = re.compile(r"[,:]")
_REGION: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_seconds(value: float, *, allow_zero: bool = False) -> float:
    """A duration: a finite number of seconds, greater than 0 (or at least 0 with `allow_zero`)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "greater than 0"
        raise ValueError(f"must be a finite number of seconds {bound}")
    return value


def parse_retention(value: Any) -> Any:
    """A retention setting from text (`7d`, `12h`, `1y`, seconds; `never`: None), in seconds."""
    if value is None or not isinstance(value, str | int) or isinstance(value, bool):
        return value
    try:
        seconds = parse_duration(value)
    except InvalidInput as e:
        raise ValueError(e.allowed) from None
    return None if seconds == FOREVER else seconds


def check_rate(value: float) -> float:
    """A rate: a finite number per second, at least 0 (0 turns off what it limits)."""
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number per second, at least 0 (0 turns the limit off)")
    return value


def check_count(value: int, *, minimum: int) -> int:
    """A whole number of at least `minimum` (retries, bytes, attempts)."""
    if value < minimum:
        raise ValueError(f"must be a whole number of at least {minimum}")
    return value


def split_list(value: Any) -> Any:
    """A list setting from text: a JSON list, or items separated by commas or colons (PATH-style)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"is not a JSON list ({e}); write a,b or a:b or a JSON list") from None
    return [item.strip() for item in _LIST_SEPARATORS.split(text) if item.strip()]


def check_database_url(url: str) -> str:
    """A SQLAlchemy URL of SQLite (in an existing folder) or PostgreSQL whose driver is installed."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise ValueError(f"is not a database URL ({e}); write sqlite:///ipab.db or postgresql+psycopg://...") from None
    backend = parsed.get_backend_name()
    if backend not in SQL_BACKENDS:
        raise ValueError(f"uses {backend!r}; only sqlite:///PATH and postgresql+psycopg://... are supported")
    try:
        parsed.get_dialect().import_dbapi()
    except Exception as e:  # NoSuchModuleError, ImportError: an unknown or missing driver
        raise ValueError(f"names a driver that is not installed ({e}); use postgresql+psycopg://...") from None
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().absolute().parent
        if not folder.is_dir():
            raise ValueError(f"puts the SQLite file in {folder}, which does not exist; create it or fix the path")
    return url


def _split_url(url: str, *, schemes: tuple[str, ...], example: str) -> SplitResult:
    parts = urlsplit(url.strip())
    if parts.scheme not in schemes:
        raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}; e.g. {example}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"has a port that is not a number from 1 to 65535; e.g. {example}") from None
    return parts


def check_redis_url(url: str) -> str:
    """A redis://, rediss:// or unix:// URL; its path, if any, is a database number (`/0`)."""
    example = "redis://127.0.0.1:6379/0"
    parts = _split_url(url, schemes=REDIS_SCHEMES, example=example)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("needs a socket path: unix:///run/redis.sock?db=0")
        return url
    if not parts.hostname:
        raise ValueError(f"has no host; e.g. {example}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"ends in /{database}, not a database number; end it in /0, /1, ... (e.g. {example})")
    return url


def check_endpoint_url(url: str | None) -> str | None:
    """An S3 endpoint: None (AWS itself) or an http(s):// URL with a host."""
    if url is None:
        return None
    example = "http://127.0.0.1:8333"
    parts = _split_url(url, schemes=S3_SCHEMES, example=example)
    if not parts.hostname:
        raise ValueError(f"has no host; e.g. {example}")
    return url


def check_bucket_name(name: str) -> str:
    """An S3 bucket name by AWS's rules: 3-63 of a-z 0-9 . -, starting and ending alphanumeric."""
    rules = "use 3-63 characters from a-z 0-9 . - that start and end with a letter or digit"
    if not _BUCKET_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"is not a valid bucket name; {rules}")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise ValueError(f"looks like an IP address, which is not a valid bucket name; {rules}")


def check_device(device: str) -> str:
    """A torch device: auto, cpu, mps, cuda or cuda:N."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise ValueError("is not a device; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_model_set_path(path: Path | None) -> Path | None:
    """A model-set.toml that exists (None: not set)."""
    if path is not None and not path.expanduser().is_file():
        raise ValueError("is not a file; point it at a model-set.toml (`ipab models download DIR` writes one)")
    return path


def check_key_prefix(prefix: str) -> str:
    """A Redis key prefix: 1-64 printable characters without spaces (`ipab:`)."""
    if not 0 < len(prefix) <= 64 or not prefix.isprintable() or any(c.isspace() for c in prefix):
        raise ValueError("must be 1-64 printable characters without spaces, e.g. ipab:")
    return prefix


def check_region(region: str) -> str:
    """An S3 region name such as us-east-1: letters, digits, `-`, `_`, `.`."""
    if not _REGION.fullmatch(region):
        raise ValueError("is not a region name; e.g. us-east-1")
    return region


def check_folders(folders: list[Path]) -> list[Path]:
    """Folders that exist (a typo must not silently allow nothing, or something else)."""
    for folder in folders:
        if not folder.expanduser().is_dir():
            raise ValueError(f"holds {str(folder)!r}, which is not a folder; separate folders with , or :")
    return folders


def check_token(token: str | None) -> str | None:
    """A secret sent in an HTTP header: unset, or 8+ printable characters without spaces."""
    if token is not None and (len(token) < 8 or not token.isprintable() or any(c.isspace() for c in token)):
        raise ValueError("must be at least 8 printable characters without spaces (it is sent in a header)")
    return token


def split_weights(value: Any) -> Any:
    """A weights setting from text: a JSON object, or `name=weight` items joined by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"is not a JSON object ({e}); write a=70,b=30 or a JSON object") from None
    weights: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"has {item!r}, which is not name=weight; write a=70,b=30")
        weights[name.strip()] = weight.strip()
    return weights


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Every weight a finite number greater than 0 (a weight of 0 would starve its lane or tenant)."""
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"gives {name!r} the weight {weight}; weights must be finite and greater than 0")
    return weights
