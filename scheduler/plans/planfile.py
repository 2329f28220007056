"""A plan file (TOML), read and validated whole: every problem as `file: field: reason`.

```toml
name = "nightly-portraits"
schedule = "30 2 * * *"          # cron, in the wall-clock time of `timezone`
timezone = "Europe/Berlin"       # IANA name; default UTC
manifest = "rows.jsonl"          # relative to this file, or s3://bucket/key
model_set = "sdxl-plain"         # a name or a model-set.toml (its rules read at apply and every slot);
                                 # default: IPAB_MODEL_SET's
tenant = "default"
lane = "scheduled"               # interactive | scheduled | bulk
catch_up = "latest"              # latest | all | none: slots missed while no beat ran
overlap = "skip"                 # skip | queue: a slot while the previous batch still runs
webhook = "https://example.com/hooks/ipab"   # told `batch.completed` of each slot's batch
enabled = true

[set]                            # defaults for every row, as `ipab submit --set`
steps = 30
```
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from scheduler.plans.manifests import manifest_location, read_plan_rows, reference_problems
from scheduler.plans.slots import check_schedule, check_timezone
from scheduler.submission.manifest import COLUMNS, ID_FIELD, parse_rows
from scheduler.submission.set_rules import apply_set_rules, names_a_file, set_rules_for, unchecked_rules_warning
from scheduler.submission.submit import resolve_model_set_name
from scheduler.tenants import check_tenant_name
from scheduler.webhooks.addresses import check_url_form
from shared.db import DEFAULT_TENANT
from shared.dispatch.policy import LANES
from shared.errors import InvalidInput, PermanentError
from shared.settings import Settings

CATCH_UP: Final = ("latest", "all", "none")
OVERLAP: Final = ("skip", "queue")
DEFAULT_LANE: Final = "scheduled"
DEFAULT_TIMEZONE: Final = "UTC"
FIELDS: Final = (
    *("name", "schedule", "timezone", "manifest", "model_set", "tenant", "lane"),
    *("set", "catch_up", "overlap", "webhook", "enabled"),
)
REQUIRED: Final = ("name", "schedule", "manifest")
# A plan's name starts its batches' names (`<plan>@<slot>`), so it has no `@` and fits in one.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PROBE_ROW: Final = {"reference": "probe.png"}
REMOTE_MODEL_SET_HINT: Final = (
    "must be a model set's name when the plan comes through the API (a model-set.toml path "
    "would be read from the server's disk)"
)


class PlanInvalid(PermanentError):
    """Raised when a plan file is refused; carries the file and every (field, reason) found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {f}: {reason}" for f, reason in problems))


@dataclass(frozen=True)
class PlanSpec:
    """A valid plan as read from its file; `manifest` is absolute or an `s3://` URI.

    `model_set_file` is the model-set toml the plan named (absolute), whose [defaults] and
    [limits] each slot reads again; None when it named the set by name (IPAB_MODEL_SET's rules
    if it is that set, else none: `warnings` says so).
    """

    name: str
    schedule: str
    timezone: str
    manifest: str
    model_set: str
    tenant: str = DEFAULT_TENANT
    lane: str = DEFAULT_LANE
    defaults: dict[str, Any] = field(default_factory=dict)
    catch_up: str = "latest"
    overlap: str = "skip"
    webhook_url: str | None = None
    enabled: bool = True
    source: str = ""
    model_set_file: str | None = None
    warnings: tuple[str, ...] = ()


def _choice(name: str, choices: tuple[str, ...], default: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value is None:
            return default
        if value not in choices:
            raise InvalidInput(name, value, f"must be one of: {', '.join(choices)}")
        return str(value)

    return check


def check_plan_name(value: Any) -> str:
    """A plan name: 1-100 letters, digits, `.`, `_`, `-`, starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput("name", value, "must be 1-100 letters, digits, '.', '_' or '-', e.g. nightly-portraits")
    return value


def _tenant(value: Any) -> str:
    return DEFAULT_TENANT if value is None else check_tenant_name(value, field="tenant")


def _enabled(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise InvalidInput("enabled", value, "must be true or false")
    return value


def check_webhook(value: Any) -> str | None:
    """An http(s) URL with a host and no credentials (delivery checks its address when it sends)."""
    return None if value is None else check_url_form(value, field="webhook")


def check_set(value: Any) -> dict[str, Any]:
    """The `set` table: defaults for every row, checked as `--set` and the row validator check them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("set", value, "must be a table of job fields, e.g. [set] steps = 30")
    allowed = [c for c in COLUMNS if c != ID_FIELD]
    for key in value:
        if key not in allowed:
            raise InvalidInput(f"set.{key}", value[key], f"is not a job field; allowed: {', '.join(allowed)}")
    probe = parse_rows([(1, _PROBE_ROW)], defaults={"prompt": "probe", **value}, source="the plan's set table")
    for problem in probe.problems:
        raise InvalidInput(f"set.{problem.field}", value.get(problem.field), problem.reason)
    return dict(value)


def _model_set(value: Any, *, base_dir: Path | None, settings: Settings) -> tuple[str, str | None]:
    """The model set's name, and the absolute path of the model-set.toml the plan named (None for a name).

    `value` is a bare name, a model-set.toml (relative to the plan file), or None for
    IPAB_MODEL_SET's. `base_dir` None (a plan sent over the API): a bare name only, since a
    path would be read from the server's disk.
    """
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidInput("model_set", value, "must be a model set name or a model-set.toml path")
    if base_dir is None and value is not None:
        if not _NAME.fullmatch(value):
            raise InvalidInput("model_set", value, REMOTE_MODEL_SET_HINT)
        return str(value), None
    if isinstance(value, str) and value.endswith(".toml") and base_dir is not None:
        value = str(base_dir / value)
    file = str(Path(value).expanduser().resolve()) if names_a_file(value) else None
    try:
        return resolve_model_set_name(value, settings), file
    except InvalidInput as e:
        raise InvalidInput("model_set", value, "is needed: write model_set = NAME, or set IPAB_MODEL_SET") from e
    except PermanentError as e:  # a model-set.toml that cannot be read
        raise InvalidInput("model_set", value, f"{e}; fix the path or write the model set's name") from None


def _parse_toml(text: str, *, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanInvalid(source, [("file", f"is not valid TOML ({e}); fix the syntax")]) from None


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanInvalid(str(path), [("file", "does not exist; check the path")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanInvalid(str(path), [("file", f"cannot be read ({e}); check its permissions")]) from None
    return _parse_toml(text, source=str(path))


class _Problems:
    """Runs each field's check, collecting every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def check(self, check: Callable[[], Any]) -> Any:
        """The checked value, or None with the problem recorded."""
        try:
            return check()
        except InvalidInput as e:
            self.found.append((e.field, str(e).removeprefix(f"`{e.field}` ")))
            return None


MAX_ROW_PROBLEMS_SHOWN: Final = 20


def _row_problems(spec: Mapping[str, Any], settings: Settings, *, local: bool) -> list[tuple[str, str]]:
    """Problems of the manifest's rows and references, as `manifest: line N: field: reason`.

    Rows outside the model set's [limits] are problems too, checked with the rules each slot's
    submission applies (`set_rules_for`: the set toml the plan named, else IPAB_MODEL_SET's when
    it is this set).
    """
    rows = read_plan_rows(spec["manifest"], defaults=spec["defaults"], settings=settings, local=local)
    parsed = rows.parsed
    if spec["model_set"] is not None:
        rules = set_rules_for(spec["model_set_file"], spec["model_set"], settings)
        parsed = apply_set_rules(parsed, rules, model_set=spec["model_set"])
    problems = sorted(parsed.problems + reference_problems(rows), key=lambda p: p.line)
    shown = [("manifest", f"line {p.line}: {p.field}: {p.reason}") for p in problems[:MAX_ROW_PROBLEMS_SHOWN]]
    if len(problems) > MAX_ROW_PROBLEMS_SHOWN:
        shown.append(("manifest", f"and {len(problems) - MAX_ROW_PROBLEMS_SHOWN} more problem(s)"))
    return shown


def _fields(
    raw: Mapping[str, Any], problems: _Problems, *, base_dir: Path | None, settings: Settings
) -> dict[str, Any]:
    get = raw.get
    fields = {
        "name": problems.check(lambda: check_plan_name(get("name"))),
        "schedule": problems.check(lambda: check_schedule(get("schedule"))),
        "timezone": problems.check(lambda: check_timezone(get("timezone", DEFAULT_TIMEZONE)).key),
        "manifest": problems.check(lambda: manifest_location(get("manifest"), base_dir=base_dir)),
        "model_set": problems.check(lambda: _model_set(get("model_set"), base_dir=base_dir, settings=settings)),
        "tenant": problems.check(lambda: _tenant(get("tenant"))),
        "lane": problems.check(lambda: _choice("lane", LANES, DEFAULT_LANE)(get("lane"))),
        "defaults": problems.check(lambda: check_set(get("set"))),
        "catch_up": problems.check(lambda: _choice("catch_up", CATCH_UP, "latest")(get("catch_up"))),
        "overlap": problems.check(lambda: _choice("overlap", OVERLAP, "skip")(get("overlap"))),
        "webhook_url": problems.check(lambda: check_webhook(get("webhook"))),
        "enabled": problems.check(lambda: _enabled(get("enabled"))),
    }
    fields["model_set"], fields["model_set_file"] = fields["model_set"] or (None, None)
    return fields


def _warnings(raw: Mapping[str, Any], spec: Mapping[str, Any], settings: Settings) -> tuple[str, ...]:
    """What applying the plan is told but not refused for: a set whose rules this host cannot read."""
    if raw.get("model_set") is None or spec["model_set_file"] is not None:
        return ()
    warning = unchecked_rules_warning(raw["model_set"], spec["model_set"], settings, field="model_set")
    return () if warning is None else (warning,)


def read_plan_file(path: Path, *, settings: Settings) -> PlanSpec:
    """Read and validate a plan file, its manifest's rows included; `PlanInvalid` with every problem.

    Nothing is written: applying a valid plan is `scheduler.plans.store.apply_plan`.
    """
    raw = _load_toml(path)
    return _validated(raw, source=str(path), base_dir=path.parent, stored_as=str(path.resolve()), settings=settings)


def reads_local_files(source: str) -> bool:
    """Whether a stored plan may read this host's disk (its manifest, its references), at every slot.

    Only a plan applied from a plan file, whose `source` is that file's absolute path
    (`read_plan_file`). A plan sent through the API (`api (key ...)`) reads S3 alone, and so
    does any other source: when in doubt, the disk stays closed.
    """
    return Path(source).is_absolute()


def read_plan_text(text: str, *, source: str, settings: Settings) -> PlanSpec:
    """Validate a plan file's text sent over the API, as `read_plan_file` does a file.

    Nothing may point at the server's disk: `manifest` must be an `s3://` URI in an allowed
    bucket and `model_set` a name. `source` names the plan in problems and in `ipab plans show`.
    """
    raw = _parse_toml(text, source=source)
    return _validated(raw, source=source, base_dir=None, stored_as=source, settings=settings)


def _validated(
    raw: Mapping[str, Any], *, source: str, base_dir: Path | None, stored_as: str, settings: Settings
) -> PlanSpec:
    """The plan of a parsed plan file; `base_dir` None admits nothing from the server's disk."""
    # 1. Only known fields.
    problems = _Problems()
    problems.found += [(k, f"is not a plan field; allowed: {', '.join(FIELDS)}") for k in raw if k not in FIELDS]
    problems.found += [(k, "is required") for k in REQUIRED if k not in raw]
    # 2. Each field on its own (cron, time zone, the manifest's location, ...).
    spec = _fields(raw, problems, base_dir=base_dir, settings=settings)
    # 3. The manifest's rows with the plan's defaults, once the fields they need are valid.
    if spec["manifest"] is not None and spec["defaults"] is not None:
        local = base_dir is not None
        problems.found += problems.check(lambda: _row_problems(spec, settings, local=local)) or []
    if problems.found:
        raise PlanInvalid(source, problems.found)
    return PlanSpec(**spec, source=stored_as, warnings=_warnings(raw, spec, settings))


def defaults_json(spec: PlanSpec) -> str:
    """The plan's `set` table as stored (JSON, keys sorted)."""
    return json.dumps(spec.defaults, sort_keys=True)
