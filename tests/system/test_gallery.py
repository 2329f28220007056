"""`ipab gallery`: the page of a real worker's batch, loaded in headless Chromium (Debian's, via Playwright).

Set `UPDATE_DOCS_SCREENSHOT=1` to copy the screenshot to docs/gallery.png (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.batches.record import JobRecord
from scheduler.gallery.build import card_html, render_gallery
from shared.db import Batch, JobStatus, make_engine, make_session_factory
from shared.storage import ObjectStore
from tests.system.conftest import REPO, DatasetBatch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def visible_cards(page: Any) -> int:
    return int(page.locator(".card:visible").count())


@pytest.mark.slow
def test_the_gallery_shows_one_card_per_job_and_filters_by_status_and_text(
    dataset_batch: DatasetBatch, browser: Any, tmp_path: Path
) -> None:
    run = dataset_batch.ipab("gallery", dataset_batch.batch_id, "--out", str(tmp_path / "gallery"))
    assert run.returncode == 0, run.stderr
    index = Path(run.stdout.strip())
    jobs = dataset_batch.jobs()
    failed = [j for j in jobs if j.status == JobStatus.failed.value]

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(index.as_uri())
    page.wait_for_load_state("load")

    assert problems == []
    assert page.locator(".card").count() == len(jobs) == visible_cards(page)
    loaded = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)  # every output and reference thumbnail decoded
    assert page.locator(".card .error").count() == len(failed) > 0
    page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)

    page.select_option("#status-filter", JobStatus.failed.value)
    assert visible_cards(page) == len(failed)
    assert page.locator("#shown-count").inner_text() == f"{len(failed)} of {len(jobs)} shown"
    page.select_option("#status-filter", "")
    page.fill("#text-filter", "BRONZE statue")
    statues = [j for j in jobs if json.loads(j.spec)["params"]["prompt"] == "a bronze statue"]
    assert visible_cards(page) == len(statues) > 0
    page.select_option("#status-filter", JobStatus.succeeded.value)
    assert visible_cards(page) == sum(1 for j in statues if j.status == JobStatus.succeeded.value)
    assert problems == []
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "gallery.png", REPO / "docs" / "gallery.png")


@pytest.mark.slow
def test_render_gallery_embeds_every_thumbnail_for_the_api(dataset_batch: DatasetBatch) -> None:
    engine = make_engine(dataset_batch.settings.database_url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        batch = session.get(Batch, dataset_batch.batch_id)
        assert batch is not None
    try:
        page = render_gallery(sessions=sessions, store=ObjectStore.from_settings(dataset_batch.settings), batch=batch)
    finally:
        engine.dispose()

    jobs = dataset_batch.jobs()
    assert page.count('<article class="card"') == len(jobs)
    succeeded = sum(1 for j in jobs if j.status == JobStatus.succeeded.value)
    assert page.count('class="output" src="data:image/jpeg;base64,') == succeeded
    assert 'src="http' not in page and 'href="http' not in page  # nothing is loaded from elsewhere


def test_every_text_of_a_card_is_escaped() -> None:
    card = JobRecord(
        job_id="j1",
        batch_id="b1",
        line=1,
        client_id='"><script>alert(1)</script>',
        status="failed",
        lane="bulk",
        params={"prompt": "<img src=x onerror=alert(2)>", "negative_prompt": "</dd><script>"},
        seed=3,
        references=(("ab" * 32, "refs/x.png"),),
        output_key=None,
        output_sha256=None,
        output_bytes=None,
        attempts=1,
        worker_host=None,
        render_batch_size=None,
        timings={},
        cache_stats=None,
        provenance=None,
        error={"type": "InvalidInput", "message": "<b>bad</b>"},
        expires_at=None,
        data_removed_at=None,
    )

    html = card_html(card, output_src=None, reference_srcs=['" onerror="alert(3)'])

    assert "<script>" not in html and "<img src=x" not in html and "<b>" not in html
    assert '" onerror=' not in html and "&lt;script&gt;" in html
