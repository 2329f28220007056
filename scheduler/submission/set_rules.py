"""A model set's `[defaults]` and `[limits]` at submission: every entry point's rows get them here.

`ipab submit`, the HTTP API and nightly plans all submit through `submit._submit`, which calls
`apply_set_rules` on the parsed rows: each field a row did not give itself (nor the submission's
`--set` defaults) takes the set's default, and a row outside the set's limits is refused with its
line and the reason, like any invalid row. The job's spec then holds the values it runs with, so
its record says what made it.

The rules are read from the set's toml, without torch: the file `--model-set` names, or
IPAB_MODEL_SET's when the set is named by its name. A set named only by a name this host has
no toml for is submitted without its rules; its worker checks the limits again and fails such a
job with the same reason (`worker.pipeline.Renderer`).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Final

from scheduler.submission.manifest import ManifestRow, ParsedManifest, problem_from
from shared.errors import InvalidInput, PermanentError
from shared.model_set import ModelSetConfig, read_model_set
from shared.model_set_rules import NO_RULES, SetRules
from shared.settings import Settings

_CACHE_LOCK: Final = threading.Lock()
# resolved path -> ((size, mtime_ns), config): the API reads the rules for every request.
_READ: dict[Path, tuple[tuple[int, int], ModelSetConfig]] = {}


def set_rules_for(value: str | Path | None, name: str, settings: Settings) -> SetRules:
    """The rules of the set named `name`: from the toml `value` names, else IPAB_MODEL_SET's.

    `value` is what the submission named (`--model-set`: a toml path or a bare name; None for
    IPAB_MODEL_SET's). No toml of that name here: no rules (the worker checks its limits).
    """
    path = Path(value) if value is not None and (str(value).endswith(".toml") or Path(value).is_file()) else None
    for candidate in (path, settings.model_set):
        if candidate is not None:
            config = _read(candidate)
            if config is not None and config.name == name:
                return config.rules
    return NO_RULES


def _read(path: Path) -> ModelSetConfig | None:
    try:
        resolved = path.expanduser().resolve()
        stat = resolved.stat()
    except OSError:
        return None
    stamp = (stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        cached = _READ.get(resolved)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        config = read_model_set(resolved)
    except PermanentError:  # a broken toml: `resolve_model_set_name` has said so, or will
        return None
    with _CACHE_LOCK:
        _READ[resolved] = (stamp, config)
    return config


def apply_set_rules(parsed: ParsedManifest, rules: SetRules, *, model_set: str) -> ParsedManifest:
    """The rows with the set's defaults filled in; rows outside its limits become problems (line, field, reason)."""
    if rules.empty:
        return parsed
    rows: list[ManifestRow] = []
    problems = list(parsed.problems)
    unchecked = dict(parsed.unchecked_references)
    for row in parsed.rows:
        try:
            params = rules.fill(row.params, explicit=row.explicit)
            rules.check(params, model_set=model_set)
        except InvalidInput as e:
            problems.append(problem_from(row.line, e))
            unchecked[row.line] = row.references  # their files are checked too: every problem at once
            continue
        rows.append(row if params is row.params else replace(row, params=params))
    if len(problems) == len(parsed.problems):
        return replace(parsed, rows=rows)
    return replace(parsed, rows=rows, problems=sorted(problems, key=lambda p: p.line), unchecked_references=unchecked)
