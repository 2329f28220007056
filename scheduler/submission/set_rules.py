"""A model set's `[defaults]` and `[limits]` at submission: every entry point's rows get them here.

`ipab submit`, the HTTP API and nightly plans all submit through `submit._submit`, which calls
`apply_set_rules` on the parsed rows: each field a row did not give itself (nor the submission's
`--set` defaults) takes the set's default, and a row outside the set's limits is refused with its
line and the reason, like any invalid row. The job's spec then holds the values it runs with, so
its record says what made it.

The rules are read from the set's toml, without torch: the file the submission names
(`--model-set path.toml`, a plan's `model_set = "fast.toml"`, read again at every slot), or
IPAB_MODEL_SET's when the set is named by its name. Nothing else records a set's rules (workers
publish none), so a set named only by a name this host has no toml for is submitted without
them, with the warning of `unchecked_rules_warning`; its worker checks the limits again and
fails such a job with the same reason (`worker.pipeline.Renderer`). It is a warning and not a
refusal because the scheduler cannot tell such a set from one that has no rules at all, which
hosts without the set's toml submit to by name.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Final

from scheduler.submission.manifest import ManifestRow, ParsedManifest, problem_from
from shared.errors import InvalidInput, ModelSetError, PermanentError
from shared.model_set import ModelSetConfig, read_model_set
from shared.model_set_rules import NO_RULES, SetRules
from shared.settings import Settings

_CACHE_LOCK: Final = threading.Lock()
# resolved path -> ((size, mtime_ns), config): the API reads the rules for every request.
_READ: dict[Path, tuple[tuple[int, int], ModelSetConfig]] = {}


def names_a_file(value: str | Path | None) -> bool:
    """Whether a `--model-set` value names a model-set toml (else it is a bare name, or None)."""
    return value is not None and (str(value).endswith(".toml") or Path(value).is_file())


def known_set_rules(value: str | Path | None, name: str, settings: Settings) -> SetRules | None:
    """The rules of the set named `name` from the toml `value` names, else IPAB_MODEL_SET's; None: no toml here.

    `value` is what the submission named (`--model-set`: a toml path or a bare name; None for
    IPAB_MODEL_SET's).
    """
    path = Path(value) if value is not None and names_a_file(value) else None
    for candidate in (path, settings.model_set):
        if candidate is not None:
            config = _read(candidate)
            if config is not None and config.name == name:
                return config.rules
    return None


def set_rules_for(value: str | Path | None, name: str, settings: Settings) -> SetRules:
    """`known_set_rules`, or no rules when this host has no toml of the set (its worker checks its limits)."""
    rules = known_set_rules(value, name, settings)
    return NO_RULES if rules is None else rules


def rules_from_file(path: str | Path, *, name: str) -> SetRules:
    """The rules in the model-set toml at `path`, which must still name the set `name`.

    For a plan's slot, which reads the file its plan named again: `ModelSetError` (a failed
    slot, with the reason) when the file is gone, broken, or now names another set.
    """
    config = _read_or_raise(Path(path))
    if config.name != name:
        raise ModelSetError(
            f"model set file {config.source} now names set {config.name!r}, not {name!r} as when the plan "
            "was applied; restore the name, or apply the plan again"
        )
    return config.rules


def unchecked_rules_warning(value: str | None, name: str, settings: Settings, *, field: str) -> str | None:
    """What a submission is told when the set's rules cannot be read here (None when they can).

    `field` is where the set was named (`--model-set`, a plan's `model_set`), for the fix.
    """
    if known_set_rules(value, name, settings) is not None:
        return None
    configured = "is not set" if settings.model_set is None else f"is {settings.model_set}"
    toml = f"{field} path/to/model-set.toml" if field.startswith("--") else f'{field} = "path/to/model-set.toml"'
    return (
        f"`{field}` is {name!r}: this host has no model-set toml of that set (IPAB_MODEL_SET {configured}), "
        "so its [defaults] and [limits] are not applied: rows take the global defaults, and its worker "
        f"fails every job outside its limits. To apply them, name the set's toml ({toml}), "
        "or give the scheduler that toml as IPAB_MODEL_SET"
    )


def _read(path: Path) -> ModelSetConfig | None:
    try:
        return _read_or_raise(path)
    except PermanentError:  # a broken toml: `resolve_model_set_name` has said so, or will
        return None


def _read_or_raise(path: Path) -> ModelSetConfig:
    resolved = path.expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return read_model_set(resolved)  # raises `ModelSetError`, naming the file
    stamp = (stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        cached = _READ.get(resolved)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    config = read_model_set(resolved)
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
