"""`ipab api`: serve the HTTP API (FastAPI on uvicorn) with its webhook dispatcher."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Final

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000
# While a thread parses a large batch, the event loop waits up to this long for the GIL each
# time it wakes (Python's default is 5 ms), and a GET of a job wakes it several times. Measured
# (bench/two_tenants.py, 2 cores): another tenant's GET p50 beside a 99,000-row batch and the
# other attacks went from 43 ms at 5 ms to 30 ms at 1 ms (11 ms alone).
SWITCH_INTERVAL_S: Final = 0.001


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API until interrupted."""
    import uvicorn

    from scheduler.api.app import create_app
    from shared.settings import load_settings

    app = create_app(load_settings(), metrics_host=args.host)  # IPAB_API_METRICS_PORT on the same address
    app.state.ctx.batch_processes.start()  # ready for the first large batch (scheduler/api/batch_processes.py)
    # What start-up built (modules, the app, its routes and models) lives as long as the
    # process: out of the collector's sight, a full collection scans only what requests
    # made. Before this, each one stalled every request in flight for about 100 ms.
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def register(subparsers: Any) -> None:
    """Add `ipab api`."""
    p = subparsers.add_parser("api", help="serve the HTTP API (/v1, /docs, /openapi.json)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.set_defaults(func=cmd_api)
