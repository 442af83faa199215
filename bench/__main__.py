"""`python -m interactive.bench`: the same as `interactive bench` (see bench/harness.py)."""

import sys

from interactive.bench.harness import main

sys.exit(main())
