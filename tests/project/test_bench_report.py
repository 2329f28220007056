"""`make bench --only ...` and benches run on their own keep what the run did not measure (bench.report.carry_over)."""

from __future__ import annotations

from bench.report import EARLIER, KEPT_NOTE, carry_over


def _file(goals: list[str], sections: dict[str, str]) -> str:
    parts = ["# ipab benchmarks", "", "- Date: DATE", "", "## Goals", "", "| goal | target | measured | verdict |"]
    parts += ["| --- | --- | ---: | --- |", *goals]
    for heading, body in sections.items():
        parts += ["", f"## {heading}", "", body]
    return "\n".join(parts) + "\n"


PREVIOUS = _file(
    [
        "| overhead | <= 1.05 | 1.004 | met |",
        "| control jobs/s | >= 500 | 151 jobs/s | **missed** |",
        "| claim at 10M rows | <= 1.5x | 1.37x | met |",
        "| a retired goal | <= 1x | 0.5x | met |",
    ],
    {
        "1. System overhead": "old overhead table",
        "3. Control-plane capacity": "old control table",
        "12. Table growth": "growth table from its own run",
    },
)
# A run of `--only overhead`: the control section and goal say "not run", table growth is not written.
NEW = _file(
    [
        "| overhead | <= 1.05 | 1.010 | met |",
        "| control jobs/s | >= 500 | not run | not measured |",
        "| claim at 10M rows | <= 1.5x | run on its own | not measured |",
    ],
    {"1. System overhead": "new overhead table", "3. Control-plane capacity": "Not run."},
).replace("DATE", "today")


def test_a_partial_run_keeps_every_other_section_and_goal_marked_as_kept() -> None:
    out = carry_over(NEW, PREVIOUS, ran={"overhead"})
    assert "- Date: today" in out
    assert "new overhead table" in out and "old overhead table" not in out
    assert "old control table" in out and "Not run." not in out
    assert "growth table from its own run" in out
    assert out.count(KEPT_NOTE) == 2  # control and table growth, not the overhead that ran
    assert "| overhead | <= 1.05 | 1.010 | met |" in out
    assert f"| control jobs/s | >= 500 | 151 jobs/s{EARLIER} | **missed** |" in out
    assert f"| claim at 10M rows | <= 1.5x | 1.37x{EARLIER} | met |" in out
    assert "a retired goal" not in out  # renamed or dropped goals are not carried
    assert out.index("## 1.") < out.index("## 3.") < out.index("## 12.")


def test_a_section_that_ran_replaces_the_kept_one_and_keeping_twice_marks_once() -> None:
    once = carry_over(NEW, PREVIOUS, ran={"overhead"})
    twice = carry_over(NEW, once, ran={"overhead"})
    assert twice.count(KEPT_NOTE) == 2 and twice.count(EARLIER) == 2
    control = NEW.replace("Not run.", "new control table").replace("not run | not measured", "480 jobs/s | **missed**")
    rerun = carry_over(control, twice, ran={"overhead", "control"})
    assert "new control table" in rerun and "old control table" not in rerun
    assert "| control jobs/s | >= 500 | 480 jobs/s | **missed** |" in rerun
    assert rerun.count(KEPT_NOTE) == 1  # table growth only


def _round(central_ms: float, jobs_per_s: float) -> dict[str, object]:
    cpu = {"postgres": central_ms * 0.7, "redis": central_ms * 0.2, "control": central_ms * 0.1, "central": central_ms}
    return {
        "cpu_ms_per_job": cpu,
        "steady_state_jobs_per_s": jobs_per_s,
        "end_to_end_jobs_per_s": jobs_per_s * 0.9,
        "fleet_per_central_core": {"1": 1000 / central_ms, "4": 4000 / central_ms},
    }


def test_the_control_plane_shows_its_median_round_whole_and_lists_every_round() -> None:
    from bench.control_plane import _median_round
    from bench.report import _control

    # A busy minute made the second round slow: the median round is shown, all three are listed.
    figures = _median_round([_round(0.85, 230), _round(1.20, 170), _round(0.80, 240)])
    assert figures["cpu_ms_per_job"]["central"] == 0.85 and figures["steady_state_jobs_per_s"] == 230
    text = "\n".join(_control({"jobs": 3000, "workers": 4, "rounds": 3, "postgres": figures}))
    assert "| postgres | **230** |" in text and "= **0.850** |" in text
    assert "Every round on postgres, in order (central CPU per job at steady-state jobs/s): 0.850 ms at 230" in text
    assert "1.200 ms at 170 jobs/s; 0.800 ms at 240 jobs/s." in text
