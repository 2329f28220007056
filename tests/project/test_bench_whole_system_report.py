"""Section 1 of BENCHMARKS.md and the goals table show issue 22's whole-system ratio (bench.overhead's
`whole`), and a run from before it (`--from-json` of an old file) still renders, saying it was not measured."""

from __future__ import annotations

from typing import Any

from bench.report import goals, render_markdown

MACHINE = {"date": "D", "cpu": "C", "cores": 2, "os": "O", "python": "3.11", "load_average_1m_at_start": 0.5}
STEADY = {
    "torch_threads": "1",
    "torch_threads_used": 1,
    "bare_s_per_job": 0.2,
    "ipab_s_per_job": 0.21,
    "bare_rounds": [0.2],
    "ipab_rounds": [0.21],
    "ratio": 1.05,
    "ipab_row_means": {},
}
WHOLE_NAME = "whole system, 40 jobs: `ipab submit` + `ipab status --watch` + `ipab results` / bare loop"


def whole_row(threads: str, *, ipab_s: float, bare_loop_s: float) -> dict[str, Any]:
    steps = {"submit_s": 1.25, "watch_s": ipab_s - 2.0, "results_s": 0.75, "ipab_s": ipab_s}
    return {
        "torch_threads": threads,
        "torch_threads_used": 2 if threads == "default" else 1,
        "bare_loop_s": bare_loop_s,
        "bare_process_s": bare_loop_s + 9.0,
        "ipab_s": ipab_s,
        **{f"ipab_{step}": steps[step] for step in ("submit_s", "watch_s", "results_s")},
        "ratio": ipab_s / bare_loop_s,
        "ratio_process": ipab_s / (bare_loop_s + 9.0),
        "rounds": {"bare_loop_s": [bare_loop_s], "bare_process_s": [bare_loop_s + 9.0], "ipab": [steps]},
    }


def results_with(whole: dict[str, Any] | None) -> dict[str, Any]:
    overhead = {"jobs": 50, "rounds": 1, "row": {"width": 128, "height": 128, "steps": 8}, "by_threads": [STEADY]}
    if whole is not None:
        overhead["whole"] = whole
    return {"machine": MACHINE, "postgres": False, "overhead": overhead}


def goal_rows(results: dict[str, Any]) -> dict[str, tuple[str, str, bool | None]]:
    return {g.name: (g.target, g.measured, g.met) for g in goals(results) if g.name.startswith("whole system")}


def test_the_whole_system_ratio_is_a_goal_per_thread_count_and_a_row_of_section_one() -> None:
    rows = [whole_row("default", ipab_s=10.0, bare_loop_s=8.0), whole_row("1", ipab_s=9.0, bare_loop_s=8.5)]
    whole = {"jobs": 40, "warm_jobs": 2, "by_threads": rows}
    rows[0]["ipab_watch_parts"] = {
        "first_start_after_submit_s": 0.5,
        "worker_span_s": 7.0,
        "watch_end_after_last_finish_s": 0.5,
    }
    results = results_with(whole)

    assert goal_rows(results) == {
        f"{WHOLE_NAME}, default torch threads": ("<= 1.1", "1.250 (10.0 s / 8.0 s, 2 threads)", False),
        f"{WHOLE_NAME}, 1 torch thread": ("<= 1.1", "1.059 (9.0 s / 8.5 s)", True),
    }
    markdown = render_markdown(results, command="python -m bench.run")
    section = markdown.split("## 1.", 1)[1].split("## 2.", 1)[0]
    assert "already running with its model loaded" in section
    assert (
        "| default torch threads (2) | 8.00 | 17.00 | 10.00 (1.25 + 8.00 + 0.75) | **1.250** (goal <= 1.1) " in section
    )
    assert (
        "Where the watch's 8.00 s went, default torch threads (2): the first job started +0.50 s from `ipab submit`'s "
        "exit (dispatcher and worker pick-up; below 0: before the process had exited), the worker took 7.00 s "
        "from the first job's start to the last one's finish (the bare loop: 8.00 s), and "
        "`ipab status --watch` exited 0.50 s after the last finish."
    ) in section
    assert "Where the watch's 7.00 s went" not in section  # a row without the parts gets no sentence
    assert "| 1 torch thread | 8.50 | 17.50 | 9.00 (1.25 + 7.00 + 0.75) | **1.059** (goal <= 1.1) | 0.514 |" in section


def test_a_run_from_before_the_whole_system_figures_renders_them_as_not_measured() -> None:
    results = results_with(None)

    assert goal_rows(results) == {
        f"{WHOLE_NAME}, default torch threads": ("<= 1.1", "not measured in this run", None),
        f"{WHOLE_NAME}, 1 torch thread": ("<= 1.1", "not measured in this run", None),
    }
    markdown = render_markdown(results, command="python -m bench.run --from-json old.json")
    assert "against the bare loop): not measured in this run." in markdown
    assert "**1.050** (goal <= 1.05)" in markdown  # the steady state still renders


def test_a_skipped_or_failed_whole_system_run_says_why() -> None:
    skipped = results_with({"skipped": "not measured in this run (--whole-jobs 0)"})
    assert "(--whole-jobs 0)" in render_markdown(skipped, command="x")
    failed = results_with({"error": "RuntimeError: `ipab results` printed 39 lines for 40 rows"})
    assert {measured for _, measured, _ in goal_rows(failed).values()} == {
        "failed: RuntimeError: `ipab results` printed 39 lines for 40 rows"
    }


TWO_NAME = "whole system, 40 jobs: `ipab submit --watch` + `ipab results` / bare loop"


def test_the_goal_is_the_submit_watch_flow_where_a_run_measured_it_and_both_flows_are_shown() -> None:
    rows = [whole_row("default", ipab_s=10.0, bare_loop_s=8.0), whole_row("1", ipab_s=9.0, bare_loop_s=8.5)]
    rows[1]["two_commands"] = {
        "ipab_s": 9.3,
        "ipab_submit_watch_s": 8.8,
        "ipab_results_s": 0.5,
        "parts": {"first_start_after_start_s": 0.6, "worker_span_s": 8.2, "watch_end_after_last_finish_s": 0.1},
        "ratio": 9.3 / 8.5,
        "ratio_process": 9.3 / 17.5,
        "rounds": [9.3, 9.4],
    }
    results = results_with({"jobs": 40, "warm_jobs": 2, "by_threads": rows})

    assert goal_rows(results) == {
        f"{WHOLE_NAME}, default torch threads": ("<= 1.1", "1.250 (10.0 s / 8.0 s, 2 threads)", False),
        f"{TWO_NAME}, 1 torch thread": ("<= 1.1", "1.094 (9.3 s / 8.5 s)", True),
    }
    section = render_markdown(results, command="python -m bench.run").split("## 1.", 1)[1].split("## 2.", 1)[0]
    assert "| 1 torch thread | 8.50 | 17.50 | 9.00 (1.25 + 7.00 + 0.75) | **1.059** (goal <= 1.1) |" in section
    assert (
        "| 1 torch thread | 8.50 | 9.30 (8.80 + 0.50) | **1.094** (goal <= 1.1) | 0.531 | 0.60 | 8.20 | 0.10 "
        "| 9.30, 9.40 |"
    ) in section
    assert "`ipab submit --watch` + `ipab results` (the submission, then the same watch" in section
