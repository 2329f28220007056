"""`ipab gallery BATCH --out DIR`: the batch as a static page, `DIR/index.html`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scheduler.cli.common import database, read_batch


def cmd_gallery(args: argparse.Namespace) -> int:
    """Write the gallery; its path alone on stdout."""
    from scheduler.gallery.build import write_gallery
    from scheduler.terminal_progress import Reporter
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    settings = load_settings()
    store = ObjectStore.from_settings(settings)
    with database(settings) as sessions:
        batch = read_batch(sessions, args.batch)
        index = write_gallery(
            sessions=sessions, store=store, batch=batch, out_dir=Path(args.out), embed=args.embed, progress=Reporter()
        )
    print(index)
    return 0


def register(subparsers: Any) -> None:
    """Add `gallery`."""
    gallery = subparsers.add_parser("gallery", help="a batch as a static HTML page of cards, filterable")
    gallery.add_argument("batch", help="batch name or id")
    gallery.add_argument("--out", required=True, help="folder for index.html (and thumbs/)")
    gallery.add_argument("--embed", action="store_true", help="embed the thumbnails in index.html (one file)")
    gallery.set_defaults(func=cmd_gallery)
