"""`bench/table_growth.py` at a tiny size (a few thousand rows, a few samples of each hot path) runs to
its end and writes its BENCHMARKS.md section: it runs on its own, half an hour at full size, so a
change that breaks it (a rate limit it did not expect, a renamed function) must show here instead."""

from __future__ import annotations

import pytest

from bench import table_growth


def test_the_table_growth_benchmark_measures_every_hot_path_at_both_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, samples in (("CLAIMS", 12), ("DISPATCH_ROUNDS", 4)):  # every view: as many as its full run
        monkeypatch.setattr(table_growth, name, samples)
    figures = table_growth.run(rows=24_000, small=12_000)
    for size in ("at_small", "at_large"):
        assert {"claim", "dispatch", "batch_view"} <= set(figures[size]), figures[size]
        assert all(figures[size][name]["p50_ms"] > 0 for name in table_growth.GOALS)
    assert set(figures["ratios"]) == set(table_growth.GOALS)
    assert figures["janitor_purge_step"]["p50_ms"] > 0
    section = table_growth.to_markdown(figures)
    assert "| claim a job |" in section and "| GET /v1/batches/{id} |" in section
