"""The scheduler (sampler) names a job may ask for: one list, light enough for a command's parser.

`shared.spec` re-exports both names and validates jobs with them; this module imports nothing
of ours, so `ipab --help` can list the names without loading the job spec.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# The one list of scheduler names (the API's schema uses this type). `tcd` and `lcm` are for
# step-distilled sets (TCD-LoRA, LCM-LoRA); `euler_trailing` is Euler with trailing timestep
# spacing, as SDXL-Lightning needs.
Scheduler = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "tcd", "lcm", "euler_trailing"]
SCHEDULERS: Final[tuple[str, ...]] = get_args(Scheduler)
