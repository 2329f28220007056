"""`bench/fast_sets.py` at a tiny size (2 rows, one round) runs, measures both sets on their own
`[defaults]` and writes its BENCHMARKS.md table, so the benchmark `make bench` runs cannot rot unseen."""

from __future__ import annotations

from bench import fast_sets


def test_the_fast_set_benchmark_measures_both_sets_on_their_own_defaults_and_writes_its_table() -> None:
    figures = fast_sets.run(rows=2, size_px=64, rounds=1)
    assert figures["settings"] == {
        "default": {"scheduler": "euler", "steps": 30, "guidance_scale": 5.0},
        "fast": {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0},
    }
    assert figures["unet_passes_per_step"] == {"default": 2, "fast": 1}
    assert figures["default_images_per_s"] > 0 and figures["fast_images_per_s"] > 0
    assert figures["fast_over_default"] == figures["fast_images_per_s"] / figures["default_images_per_s"]
    table = fast_sets.to_markdown(figures)
    assert "| default | euler, 30 steps, guidance 5 | 2 |" in table
    assert "| fast | tcd, 4 steps, guidance 0 | 1 |" in table
    assert f"**{figures['fast_over_default']:.2f}x**" in table
