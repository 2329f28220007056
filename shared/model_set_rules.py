"""A model set's `[defaults]` and `[limits]`: what its jobs get when they say nothing, and what they may ask.

    [defaults]                      # job fields, which a job's own values override ...
    scheduler = "tcd"
    steps = 4
    guidance_scale = 0.0
    eta = 0.3                       # ... and scheduler options, which no job field sets
    timestep_spacing = "trailing"

    [limits]                        # a row outside them is refused at submission, line and reason named
    steps = [2, 8]
    guidance_scale = [0.0, 2.0]
    scheduler = ["tcd", "lcm"]

Scheduler options go to the diffusers scheduler whatever the job's scheduler: `timestep_spacing`
into its config, `eta` into its step (TCD's gamma, DDIM's eta; schedulers without one ignore it,
as diffusers does). A step-distilled set needs them as much as its LoRA, so they belong to the
set, not to the job; provenance records them.

Pure: no I/O, no torch. The scheduler fills defaults and checks limits at submission; the
worker checks the limits again for every job (a job may have named the set by name only).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from shared.errors import InvalidInput
from shared.spec import (
    MAX_GUIDANCE,
    MAX_SIDE_PX,
    MAX_STEPS,
    MIN_SIDE_PX,
    PARAM_FIELDS,
    SCHEDULERS,
    GenerationParams,
    parse_params,
)

# Job fields a set may default (not the prompt nor the seed: those are each job's own).
DEFAULT_FIELDS: Final = tuple(name for name in PARAM_FIELDS if name not in ("prompt", "seed"))
TIMESTEP_SPACINGS: Final = ("leading", "linspace", "trailing")
SCHEDULER_OPTIONS: Final = ("timestep_spacing", "eta")
# field -> (lowest, highest) a limit may name
RANGE_LIMITS: Final[dict[str, tuple[float, float]]] = {
    "steps": (1, MAX_STEPS),
    "guidance_scale": (0.0, MAX_GUIDANCE),
    "width": (MIN_SIDE_PX, MAX_SIDE_PX),
    "height": (MIN_SIDE_PX, MAX_SIDE_PX),
}
LIMIT_KEYS: Final = (*RANGE_LIMITS, "scheduler")
# field -> an example limit, for the fix an error message shows
LIMIT_EXAMPLES: Final = {"steps": "[2, 8]", "guidance_scale": "[0.0, 2.0]", "width": "[512, 1024]"}
LIMIT_EXAMPLES["height"] = LIMIT_EXAMPLES["width"]


@dataclass(frozen=True)
class SetRules:
    """Defaults (job fields), scheduler options and limits of one model set; empty rules change nothing."""

    defaults: Mapping[str, Any] = field(default_factory=dict)
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    schedulers: tuple[str, ...] | None = None  # None: any

    @property
    def empty(self) -> bool:
        """True when the set has neither defaults nor limits (its jobs are as without rules)."""
        return not (self.defaults or self.ranges or self.schedulers is not None)

    def fill(self, params: GenerationParams, *, explicit: Collection[str]) -> GenerationParams:
        """`params` with the set's defaults in every field the job did not give itself, validated again."""
        missing = {name: value for name, value in self.defaults.items() if name not in explicit}
        if not missing:
            return params
        return parse_params({**params.to_json(), **missing})

    def check(self, params: GenerationParams, *, model_set: str) -> None:
        """`InvalidInput` naming the first field outside the set's limits, the limits and the set."""
        for name, (low, high) in self.ranges.items():
            value = getattr(params, name)
            if not low <= value <= high:
                shown = f"{_number(low)} to {_number(high)}" if low != high else _number(low)
                raise InvalidInput(name, value, f"must be {shown} on model set {model_set!r} (its [limits])")
        if self.schedulers is not None and params.scheduler not in self.schedulers:
            allowed = ", ".join(self.schedulers)
            raise InvalidInput("scheduler", params.scheduler, f"must be one of {allowed} on model set {model_set!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (for `ipab` tools and tests)."""
        limits: dict[str, Any] = {name: list(bounds) for name, bounds in self.ranges.items()}
        if self.schedulers is not None:
            limits["scheduler"] = list(self.schedulers)
        return {"defaults": dict(self.defaults), "scheduler_options": dict(self.scheduler_options), "limits": limits}


NO_RULES: Final = SetRules()


def parse_rules(defaults: Any, limits: Any) -> SetRules:
    """The `[defaults]` and `[limits]` tables, checked; `InvalidInput` names `defaults.X` or `limits.X`."""
    job_defaults, options = _split_defaults(_table("defaults", defaults))
    ranges, schedulers = _limits(_table("limits", limits))
    rules = SetRules(job_defaults, options, ranges, schedulers)
    # The defaults must themselves be a job the set accepts.
    probe = rules.fill(parse_params({"prompt": "", "seed": 0}), explicit=())
    try:
        rules.check(probe, model_set="this")
    except InvalidInput as e:
        if e.field in job_defaults:
            raise InvalidInput(f"defaults.{e.field}", job_defaults[e.field], "lies outside [limits]") from None
        raise InvalidInput(f"limits.{e.field}", getattr(probe, e.field), _outside_hint(e.field)) from None
    return rules


def _outside_hint(name: str) -> str:
    return f"excludes the global default {name}; add `{name} = ...` to [defaults]"


def _table(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(name, value, f"must be a table: [{name}]")
    return value


def _split_defaults(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    job: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key in DEFAULT_FIELDS:
            job[key] = value
        elif key in SCHEDULER_OPTIONS:
            options[key] = _option(key, value)
        else:
            allowed = ", ".join((*DEFAULT_FIELDS, *SCHEDULER_OPTIONS))
            reason = f"is not a job field nor a scheduler option; allowed: {allowed}"
            raise InvalidInput(f"defaults.{key}", value, reason)
    try:
        checked = parse_params({"prompt": "", "seed": 0, **job}).to_json()
    except InvalidInput as e:
        raise InvalidInput(f"defaults.{e.field}", e.value, e.allowed) from None
    return {key: checked[key] for key in job}, options


def _option(key: str, value: Any) -> Any:
    if key == "timestep_spacing":
        if value not in TIMESTEP_SPACINGS:
            raise InvalidInput(f"defaults.{key}", value, f"must be one of {', '.join(TIMESTEP_SPACINGS)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"defaults.{key}", value, "must be a number from 0 to 1 (TCD's gamma, DDIM's eta)")
    return float(value)


def _limits(table: dict[str, Any]) -> tuple[dict[str, tuple[float, float]], tuple[str, ...] | None]:
    ranges: dict[str, tuple[float, float]] = {}
    schedulers: tuple[str, ...] | None = None
    for key, value in table.items():
        if key == "scheduler":
            schedulers = _scheduler_list(value)
        elif key in RANGE_LIMITS:
            ranges[key] = _range(key, value)
        else:
            raise InvalidInput(f"limits.{key}", value, f"is not a limit; allowed: {', '.join(LIMIT_KEYS)}")
    return ranges, schedulers


def _range(key: str, value: Any) -> tuple[float, float]:
    lowest, highest = RANGE_LIMITS[key]
    bounds = f"{_number(lowest)} <= low <= high <= {_number(highest)}"
    hint = f"must be [low, high] with {bounds}, e.g. {key} = {LIMIT_EXAMPLES[key]}"
    if not isinstance(value, list) or len(value) != 2:
        raise InvalidInput(f"limits.{key}", value, hint)
    numbers = [v for v in value if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)]
    if len(numbers) != 2 or not lowest <= numbers[0] <= numbers[1] <= highest:
        raise InvalidInput(f"limits.{key}", value, hint)
    return numbers[0], numbers[1]


def _scheduler_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in SCHEDULERS for v in value):
        raise InvalidInput("limits.scheduler", value, f"must be a non-empty list from {', '.join(SCHEDULERS)}")
    return tuple(value)


def _number(value: float) -> str:
    return f"{value:g}"
