"""A batch as one static HTML page: a card per job (image, reference thumbnails, prompt, seed,
parameters, status, error), filtered by status and prompt text in the browser, no server needed.

`render_gallery` returns a page of it (GALLERY_PER_PAGE jobs by default, with links to the
next and previous pages) with every thumbnail embedded as a `data:` URI (what the HTTP API
can serve as is: a page costs the same whatever the batch's size); `write_gallery` writes
`DIR/index.html` with the thumbnails as files beside it (`DIR/thumbs/`), or embedded with
`embed=True`. Every text from a job is HTML-escaped, and the page loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.counts import count_batch
from scheduler.batches.record import JobRecord, batch_records
from scheduler.gallery.page import PAGE_TEMPLATE
from scheduler.terminal_progress import SILENT, Reporter
from shared.db import Batch, JobStatus
from shared.errors import ObjectMissing
from shared.jobs import transaction
from shared.redact import mask_text
from shared.storage import ObjectStore

OUTPUT_THUMB_PX: Final = 256
REFERENCE_THUMB_PX: Final = 96
THUMB_QUALITY: Final = 85
FETCH_THREADS: Final = 8
GALLERY_PER_PAGE: Final = 100  # cards per page of the API's gallery by default (an output and its references each)
MAX_GALLERY_PER_PAGE: Final = 500
PARAM_NAMES: Final = ("width", "height", "steps", "guidance_scale", "ip_adapter_scale", "scheduler", "negative_prompt")

# (object key, file stem, longest side in px) -> the <img src> for it, or None when the object is missing.
ImageSource = Callable[[str, str, int], str | None]


def batch_cards(
    sessions: sessionmaker[Session], *, batch_id: str, offset: int = 0, limit: int | None = None
) -> list[JobRecord]:
    """The records of the batch's jobs, a card each, in manifest order (a page of them: `offset`, `limit`)."""
    with transaction(sessions) as session:
        return list(batch_records(session=session, batch_id=batch_id, offset=offset, limit=limit))


def card_error(record: JobRecord) -> str | None:
    """The error a card shows: masked, since messages may quote internal URLs with credentials."""
    error = record.error
    return None if error is None else mask_text(f"{error['type']}: {error['message'] or ''}")


def thumbnail_jpeg(data: bytes, *, max_px: int) -> bytes:
    """The image as a JPEG no larger than `max_px` on its longest side (never enlarged)."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((max_px, max_px))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


class EmbeddedImages:
    """Thumbnails as `data:` URIs (a reference used by many jobs is made once)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._made: dict[tuple[str, int], str | None] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, stem: str, max_px: int) -> str | None:
        with self._lock:
            if (key, max_px) in self._made:
                return self._made[(key, max_px)]
        jpeg = _thumbnail_of(self.store, key, max_px)
        src = None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        with self._lock:
            self._made[(key, max_px)] = src
        return src


class FilesBeside:
    """Thumbnails as files under `out_dir/thumbs/`, linked by relative path."""

    def __init__(self, store: ObjectStore, out_dir: Path) -> None:
        self.store = store
        self.folder = out_dir / "thumbs"
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, stem: str, max_px: int) -> str | None:
        name = f"{stem}-{max_px}.jpg"
        if not (self.folder / name).exists():
            jpeg = _thumbnail_of(self.store, key, max_px)
            if jpeg is None:
                return None
            (self.folder / name).write_bytes(jpeg)  # same bytes whichever thread writes it
        return f"thumbs/{name}"


def _thumbnail_of(store: ObjectStore, key: str, max_px: int) -> bytes | None:
    try:
        return thumbnail_jpeg(store.get(key), max_px=max_px)
    except ObjectMissing:
        return None


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str | None, alt: str, css: str) -> str:
    if src is None:
        return f'<div class="{css} missing">{_esc(alt)}: no image</div>'
    return f'<img class="{css}" src="{_esc(src)}" alt="{_esc(alt)}" loading="lazy">'


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def _output(card: JobRecord, src: str | None) -> str:
    if card.data_removed:  # said, not a broken image: it expired or was deleted
        when = _esc(card.data_removed_at or "")
        return f'<div class="output missing removed">output removed {when} (expired or deleted)</div>'
    return _img(src, "output", "output") if card.output_key else '<div class="output missing">no output</div>'


def card_html(card: JobRecord, *, output_src: str | None, reference_srcs: Sequence[str | None]) -> str:
    """One job's card (every text escaped); a removed output is said to be removed."""
    image = _output(card, output_src)
    pairs = zip(card.references, reference_srcs, strict=True)
    refs = "".join(_img(src, f"reference {sha[:12]}", "ref") for (sha, _), src in pairs)
    shown = {name: card.params.get(name) for name in PARAM_NAMES}
    params = {"seed": card.seed, **shown, "job": card.job_id, "id": card.client_id}
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_shown(v))}</dd>" for k, v in params.items() if v not in (None, ""))
    error_text = card_error(card)
    error = f'<p class="error">{_esc(error_text)}</p>' if error_text else ""
    text = " ".join([card.prompt, card.client_id or "", card.job_id]).lower()
    return (
        f'<article class="card" data-status="{_esc(card.status)}" data-text="{_esc(text)}">{image}'
        f'<div class="refs">{refs}</div><p class="prompt">{_esc(card.prompt)}</p>'
        f'<p class="status status-{_esc(card.status)}">{_esc(card.status)}</p>{error}'
        f'<dl class="params">{rows}</dl></article>'
    )


def page_html(batch: Batch, cards: Sequence[JobRecord], card_parts: Sequence[str], *, nav: str = "") -> str:
    """The whole page around the cards: header, filters, counts, `nav` (a page's place among the
    batch's), and the filtering script."""
    counts = {s.value: sum(1 for c in cards if c.status == s.value) for s in JobStatus}
    options = "".join(f'<option value="{_esc(s)}">{_esc(s)} ({n})</option>' for s, n in counts.items() if n)
    return PAGE_TEMPLATE.substitute(
        title=_esc(f"ipab gallery: {batch.name}"),
        batch_name=_esc(batch.name),
        batch_id=_esc(batch.id),
        model_set=_esc(batch.model_set),
        total=len(cards),
        options=options,
        cards="\n".join(card_parts),
        nav=nav,
    )


def render_cards(cards: Sequence[JobRecord], *, image_src: ImageSource, progress: Reporter = SILENT) -> list[str]:
    """Each card's HTML, thumbnails fetched and made by a few threads at a time."""

    def one(card: JobRecord) -> str:
        removed = card.data_removed  # nothing to fetch: the card says so
        output_src = (
            image_src(card.output_key, card.job_id, OUTPUT_THUMB_PX) if card.output_key and not removed else None
        )
        refs = [image_src(key, f"ref-{sha}", REFERENCE_THUMB_PX) for sha, key in card.references]
        return card_html(card, output_src=output_src, reference_srcs=refs)

    parts: list[str] = []
    with progress.stage("gallery", total=len(cards)) as stage, ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for part in pool.map(one, cards):
            parts.append(part)
            stage.advance()
    return parts


def page_nav(*, page: int, per_page: int, total: int) -> str:
    """Where a page of `per_page` cards stands among a batch's `total` jobs, with links to its neighbours."""
    pages = max(1, -(-total // per_page))
    if page > pages:
        where = f"page {page} of {pages}: no jobs here"
    else:
        first, last = (page - 1) * per_page + 1, min(page * per_page, total)
        where = f"jobs {first}-{last} of {total}, page {page} of {pages}" if total else "no jobs"
    links = []
    if page > 1:
        links.append(f'<a rel="prev" href="?page={min(page - 1, pages)}&amp;per_page={per_page}">previous</a>')
    if page < pages:
        links.append(f'<a rel="next" href="?page={page + 1}&amp;per_page={per_page}">next</a>')
    return f'<nav class="pages">{_esc(where)} {" ".join(links)}</nav>'


def render_gallery(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    batch: Batch,
    page: int = 1,
    per_page: int = GALLERY_PER_PAGE,
) -> str:
    """A page of the batch's gallery (its jobs `per_page` at a time, in manifest order), thumbnails
    embedded (for the HTTP API: a page's cost is bounded by `per_page`, whatever the batch's size)."""
    cards = batch_cards(sessions, batch_id=batch.id, offset=(page - 1) * per_page, limit=per_page)
    with transaction(sessions) as session:
        total = count_batch(session=session, batch_id=batch.id).total
    nav = page_nav(page=page, per_page=per_page, total=total)
    return page_html(batch, cards, render_cards(cards, image_src=EmbeddedImages(store)), nav=nav)


def write_gallery(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    batch: Batch,
    out_dir: Path,
    embed: bool = False,
    progress: Reporter = SILENT,
) -> Path:
    """Write `out_dir/index.html` (thumbnails in `out_dir/thumbs/`, or embedded); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cards = batch_cards(sessions, batch_id=batch.id)
    source: ImageSource = EmbeddedImages(store) if embed else FilesBeside(store, out_dir)
    page = page_html(batch, cards, render_cards(cards, image_src=source, progress=progress))
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
