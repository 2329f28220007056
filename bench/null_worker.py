"""`python -m bench.null_worker worker`: the normal `ipab worker` code path with the NullRenderer (benchmarks only)."""

from __future__ import annotations

import sys

from bench.null_model import install
from ipab.cli import main

if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
