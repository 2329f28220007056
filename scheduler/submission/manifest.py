"""Manifests (JSONL or CSV) into validated rows, every problem collected as (line, field, reason).

Parameters are validated by `shared.spec.parse_params`, the same code the worker runs;
this module only reads the file, converts CSV text into values and checks what is
specific to manifests: columns, references as written, client ids, seeds, dedupe keys.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

from shared.dispatch.policy import LANES
from shared.errors import InvalidInput, TooManyRows
from shared.retention import parse_duration
from shared.spec import MAX_REFERENCES, PARAM_FIELDS, SEED_LIMIT, GenerationParams, check_text, parse_params

REFERENCE_FIELD: Final = "reference"
ID_FIELD: Final = "id"
LANE_FIELD: Final = "lane"  # scheduling, not generation: not part of the job spec nor of its identity
EXPIRES_FIELD: Final = "expires_after"  # the retention of the job's outputs (shared.retention): not its identity
COLUMNS: Final = (REFERENCE_FIELD, *PARAM_FIELDS, LANE_FIELD, EXPIRES_FIELD, ID_FIELD)
NOT_IDENTITY: Final = frozenset({LANE_FIELD, EXPIRES_FIELD})  # a row sent again with another of these is the same job
REQUIRED_COLUMNS: Final = (REFERENCE_FIELD, "prompt")
INT_FIELDS: Final = frozenset({"seed", "width", "height", "steps"})
FLOAT_FIELDS: Final = frozenset({"guidance_scale"})
MAX_CLIENT_ID_CHARS: Final = 200
JSONL_SUFFIXES: Final = frozenset({".jsonl", ".ndjson", ".json"})
_INT_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_UNDECODABLE: Final = re.compile("[\udc80-\udcff]")
# A row that is valid except for the field under test, to find every bad field of a row.
_PROBE_BASE: Final = {"prompt": "", "seed": 0}
_PARAMS: Final = frozenset(PARAM_FIELDS)


class Problem(NamedTuple):
    """One reason a manifest row is refused: its line (1-based), the field, what is wrong."""

    line: int
    field: str
    reason: str


@dataclass(frozen=True)
class ManifestRow:
    """One valid row: its parameters (seed drawn if absent), references as written, keys."""

    line: int
    params: GenerationParams
    references: tuple[str, ...]
    client_id: str | None
    dedupe_key: str
    lane: str | None = None  # None: the submission's lane
    expires_after_s: int | None = None  # None: the submission's retention; FOREVER (0): kept for ever
    # The parameters the row (or the submission's defaults) gave itself; a model set's [defaults] fill the
    # others (`scheduler.submission.set_rules`). A row built elsewhere gave all: nothing is filled.
    explicit: frozenset[str] = frozenset(PARAM_FIELDS)


@dataclass(frozen=True)
class ParsedManifest:
    """The valid rows of a manifest and the problems of the others (sorted by line).

    `unchecked_references` holds the references of invalid rows (by line), so that their
    files can be checked too and every problem of a row reported at once. `stopped_after`:
    reading stopped after this line at the problem cap (`parse_rows`' `max_problems`), and
    the lines after it were never read; None when every line was.
    """

    rows: list[ManifestRow]
    problems: list[Problem]
    unchecked_references: dict[int, tuple[str, ...]] = field(default_factory=dict)
    stopped_after: int | None = None


def problem_from(line: int, e: InvalidInput, *, prefix: str = "") -> Problem:
    """A Problem from an `InvalidInput`, without repeating the field in the reason."""
    return Problem(line, e.field, prefix + str(e).removeprefix(f"`{e.field}` "))


def convert_text_value(name: str, text: str) -> Any:
    """A CSV cell or `--set` value as a typed value; text that is not a clean number stays text.

    Text stays text so that `parse_params` refuses it with its own message ("4.2" is not
    a seed). An empty cell means absent and gives None.
    """
    value = text.strip()
    if not value:
        return None
    if name in INT_FIELDS and _INT_TEXT.fullmatch(value):
        return int(value)
    if name in FLOAT_FIELDS:
        try:
            return float(value)
        except ValueError:
            return value
    if name == "ip_adapter_scale" and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return text if name in ("prompt", "negative_prompt") else value


def parse_defaults(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` pairs as typed defaults for every row; refuses unknown keys."""
    defaults: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidInput("--set", pair, "must be key=value, e.g. --set steps=20")
        if key not in COLUMNS or key == ID_FIELD:
            raise InvalidInput("--set", pair, f"unknown key {key!r}; allowed: {', '.join(COLUMNS[:-1])}")
        value = convert_text_value(key, text)
        if value is not None:
            defaults[key] = value
    return defaults


# 1. Reading: raw rows as (line, mapping) or a problem per unreadable line.


def _decode(data: bytes) -> str:
    # Undecodable bytes become lone surrogates, so only the rows holding them are refused.
    text = data.decode("utf-8", errors="surrogateescape")
    return text.removeprefix("\ufeff")


def _not_utf8(line: int, text: str) -> Problem | None:
    bad = _UNDECODABLE.search(text)
    if bad is None:
        return None
    byte = ord(bad.group()) - 0xDC00
    return Problem(line, "manifest", f"is not UTF-8 text (byte {byte:#04x}); save the manifest as UTF-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"field {key!r} appears twice")
        seen[key] = value
    return seen


def _text_lines(text: str) -> Iterator[tuple[int, str]]:
    # Not splitlines(): it also splits at U+2028 and friends, which JSON strings may hold.
    return enumerate(text.split("\n"), start=1)


def _byte_lines(data: bytes | bytearray) -> Iterator[tuple[int, str]]:
    """The lines of `data` decoded one at a time, as `_text_lines(_decode(data))` gives them.

    For a request body: decoding it whole, then splitting it, held two more copies of it
    (four times its size once one character is outside Latin-1), and all of it was decoded
    even when reading stops at the first rows. Splitting the bytes at b"\n" splits the text
    at the same places: in UTF-8 no other character holds that byte.
    """
    start, number = (3 if data.startswith(b"\xef\xbb\xbf") else 0), 0
    while start <= len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        number += 1
        yield number, data[start:end].decode("utf-8", errors="surrogateescape")
        start = end + 1


def _read_jsonl(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Mapping[str, Any] | Problem]]:
    for number, line in lines:
        if not line.strip():
            continue
        not_utf8 = _not_utf8(number, line)
        if not_utf8:
            yield number, not_utf8
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except ValueError as e:
            yield number, Problem(number, "json", f"is not valid JSON ({e}); each line must be one JSON object")
            continue
        if not isinstance(obj, dict):
            yield number, Problem(number, "json", f"is a {type(obj).__name__}: each line must be one JSON object")
            continue
        yield number, obj


def _check_header(header: Sequence[str]) -> list[Problem]:
    problems = []
    for name in header:
        if name not in COLUMNS:
            problems.append(Problem(1, name, f"unknown column; allowed columns: {', '.join(COLUMNS)}"))
    for name, count in Counter(header).items():
        if count > 1:
            problems.append(Problem(1, name, f"column appears {count} times in the header"))
    for name in REQUIRED_COLUMNS:
        if name not in header:
            problems.append(Problem(1, name, f"required column missing from the header {list(header)}"))
    return problems


def _read_csv(text: str) -> Iterator[tuple[int, Mapping[str, Any] | Problem]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        yield from _csv_rows(reader)
    except csv.Error as e:  # a cell past csv.field_size_limit(): the rest cannot be read reliably
        line = reader.line_num
        reason = f"cannot be read ({e}); rows from here on were not read. Shorten the cell or fix its quotes"
        yield line, Problem(line, "csv", reason)


def _csv_rows(reader: Any) -> Iterator[tuple[int, Mapping[str, Any] | Problem]]:
    header = [h.strip() for h in next(reader, [])]
    header_problems = _check_header(header)
    for p in header_problems:
        yield 1, p
    if header_problems:
        return
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        not_utf8 = _not_utf8(start, "".join(cells))
        if not_utf8:
            yield start, not_utf8
            continue
        if len(cells) > len(header):
            yield start, Problem(start, "csv", f"has {len(cells)} cells but the header has {len(header)} columns")
            continue
        row = {name: convert_text_value(name, cell) for name, cell in zip(header, cells, strict=False)}
        yield start, {k: v for k, v in row.items() if v is not None}


def read_raw_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | Problem]]:
    """The rows of a JSONL or CSV manifest (by suffix; else by first character) with their lines."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInput("manifest", str(path), f"cannot be read ({e.strerror}); check the path") from None
    text = _decode(data)
    is_jsonl = path.suffix.lower() in JSONL_SUFFIXES or (
        path.suffix.lower() != ".csv" and text.lstrip().startswith("{")
    )
    yield from (_read_jsonl(_text_lines(text)) if is_jsonl else _read_csv(text))


# 2. One row: references as written, client id, parameters, seed, dedupe key.


def _split_references(value: Any) -> tuple[str, ...]:
    parts: Any = value.split("|") if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise InvalidInput(REFERENCE_FIELD, value, "must be a path or s3:// URI, several joined by |")
    refs = tuple(p.strip() for p in parts)
    if not refs or any(not r for r in refs):
        raise InvalidInput(REFERENCE_FIELD, value, "has an empty entry; separate references with a single |")
    if len(refs) > MAX_REFERENCES:
        raise InvalidInput(REFERENCE_FIELD, value, f"has {len(refs)} images; at most {MAX_REFERENCES} per job")
    return refs


def _client_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInput(ID_FIELD, value, "must be a string (a client key unique in the batch)")
    text = check_text(ID_FIELD, str(value)).strip()
    if not text or len(text) > MAX_CLIENT_ID_CHARS or "\n" in text:
        raise InvalidInput(ID_FIELD, value, f"must be 1 to {MAX_CLIENT_ID_CHARS} characters on one line")
    return text


def _param_problems(line: int, raw: Mapping[str, Any], first: InvalidInput) -> list[Problem]:
    found = []
    for name, value in raw.items():
        try:
            parse_params({**_PROBE_BASE, name: value})
        except InvalidInput as e:
            found.append(problem_from(line, e))
    return found or [problem_from(line, first)]


def canonical_row(raw: Mapping[str, Any]) -> str:
    """The row as canonical JSON: equal rows (from JSONL or CSV) give equal text."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _RowBuilder:
    """Builds rows one by one, remembering client ids and identical rows seen so far."""

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.client_lines: dict[str, int] = {}
        self.occurrences: Counter[bytes] = Counter()  # sha256 of a row's canonical text -> times seen
        self.unchecked_references: dict[int, tuple[str, ...]] = {}

    def build(self, line: int, raw_row: Mapping[str, Any]) -> ManifestRow | list[Problem]:
        """A valid row, or every problem found in it."""
        raw = {**self.defaults, **{k: v for k, v in raw_row.items() if v is not None}}
        problems = [Problem(line, k, f"unknown column; allowed: {', '.join(COLUMNS)}") for k in raw if k not in COLUMNS]
        refs = self._references(line, raw, problems)
        client_id = self._client_id(line, raw, problems)
        lane = _lane(line, raw.get(LANE_FIELD), problems)
        expires_after_s = _expires_after(line, raw.get(EXPIRES_FIELD), problems)
        params = self._params(line, {k: v for k, v in raw.items() if k in PARAM_FIELDS}, problems)
        if problems or params is None:
            if refs:
                self.unchecked_references[line] = refs
            return problems
        identity = {k: v for k, v in raw.items() if k not in NOT_IDENTITY}
        dedupe_key = self._dedupe_key(identity, client_id)
        return ManifestRow(line, params, refs, client_id, dedupe_key, lane, expires_after_s, explicit=_given(raw))

    def _references(self, line: int, raw: Mapping[str, Any], problems: list[Problem]) -> tuple[str, ...]:
        if REFERENCE_FIELD not in raw:
            problems.append(Problem(line, REFERENCE_FIELD, "is required: a path or s3:// URI of the reference image"))
            return ()
        try:
            return _split_references(raw[REFERENCE_FIELD])
        except InvalidInput as e:
            problems.append(problem_from(line, e))
            return ()

    def _client_id(self, line: int, raw: Mapping[str, Any], problems: list[Problem]) -> str | None:
        try:
            client_id = _client_id(raw.get(ID_FIELD))
        except InvalidInput as e:
            problems.append(problem_from(line, e))
            return None
        if client_id is None:
            return None
        first = self.client_lines.setdefault(client_id, line)
        if first != line:
            problems.append(
                Problem(line, ID_FIELD, f"{client_id!r} is a duplicate of line {first}; ids must be unique")
            )
        return client_id

    def _params(self, line: int, raw: dict[str, Any], problems: list[Problem]) -> GenerationParams | None:
        if "seed" not in raw:
            # Drawn once and stored, so every output can be reproduced.
            raw = {**raw, "seed": secrets.randbelow(SEED_LIMIT)}
        try:
            return parse_params(raw)
        except InvalidInput as e:
            problems.extend(_param_problems(line, raw, e))
            return None

    def _dedupe_key(self, raw: Mapping[str, Any], client_id: str | None) -> str:
        if client_id is not None:
            return _sha256("id\0" + client_id)
        # The n-th copy of an identical unseeded row is its own job, but the same n-th
        # copy submitted again is not a new one.
        canonical = canonical_row(raw)
        seen = hashlib.sha256(canonical.encode()).digest()  # not the text: 100k rows kept 70 MiB of it
        self.occurrences[seen] += 1
        return _sha256(f"{canonical}\0{self.occurrences[seen]}")


def _given(raw: Mapping[str, Any]) -> frozenset[str]:
    """The parameters a row (or the submission's defaults) set itself."""
    return _PARAMS.intersection(raw)


def check_lane(value: Any, *, field: str = LANE_FIELD) -> str:
    """A lane name (`interactive`, `scheduled`, `bulk`), or `InvalidInput` naming the field."""
    if value not in LANES:
        raise InvalidInput(field, value, f"is not a lane; use one of {', '.join(LANES)}")
    return str(value)


def _lane(line: int, value: Any, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    try:
        return check_lane(value)
    except InvalidInput as e:
        problems.append(problem_from(line, e))
        return None


def _expires_after(line: int, value: Any, problems: list[Problem]) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value, field=EXPIRES_FIELD)
    except InvalidInput as e:
        problems.append(problem_from(line, e))
        return None


def read_jsonl_bytes(data: bytes | bytearray) -> Iterator[tuple[int, Mapping[str, Any] | Problem]]:
    """The rows of a JSONL document (an HTTP body) with their lines, as `read_raw_rows` gives them;
    each line is decoded and parsed only when it is asked for."""
    return _read_jsonl(_byte_lines(data))


def parse_manifest(
    path: Path, *, defaults: Mapping[str, Any] | None = None, max_problems: int | None = None
) -> ParsedManifest:
    """Read and validate every row of the manifest at `path`, applying `defaults` (row values win).

    Problems are collected for every row, never raised one at a time (up to `max_problems`:
    then reading stops, as `parse_rows` says). An empty manifest is one problem (line 1).
    References are checked as written here; whether the files exist and decode is
    `scheduler.submission.references`' job.
    """
    source = repr(str(path))
    return parse_rows(read_raw_rows(path), defaults=defaults, source=source, max_problems=max_problems)


def parse_rows(
    raw_rows: Iterable[tuple[int, Mapping[str, Any] | Problem]],
    *,
    defaults: Mapping[str, Any] | None = None,
    source: str = "the manifest",
    max_rows: int | None = None,
    max_problems: int | None = None,
) -> ParsedManifest:
    """Validate rows read from a manifest or an HTTP request: the one validator of every job row.

    Rows are read one at a time, so the caps bound the work, not only the answer: with
    `max_rows`, the row past it raises `TooManyRows` before it is parsed; with `max_problems`,
    reading stops after the line that brings the problems to it (`stopped_after` says which),
    and a body of a million bad lines costs what its first few do.
    """
    builder = _RowBuilder(defaults or {})
    rows: list[ManifestRow] = []
    problems: list[Problem] = []
    remaining = iter(raw_rows)
    stopped_after = None
    for count, (line, raw) in enumerate(remaining, start=1):
        if max_rows is not None and count > max_rows:
            raise TooManyRows(max_rows)
        built = raw if isinstance(raw, Problem) else builder.build(line, raw)
        if isinstance(built, ManifestRow):
            rows.append(built)
        else:
            problems.extend([built] if isinstance(built, Problem) else built)
        if max_problems is not None and len(problems) >= max_problems:
            stopped_after = line if next(remaining, None) is not None else None
            break
    if not rows and not problems:
        problems.append(Problem(1, "manifest", f"{source} has no rows; give one JSON object or CSV row per job"))
    ordered = sorted(problems, key=lambda p: p.line)
    return ParsedManifest(rows, ordered, builder.unchecked_references, stopped_after)
