"""`python -m ipab`: the same as the `ipab` command."""

import sys

from ipab.cli import main

sys.exit(main())
