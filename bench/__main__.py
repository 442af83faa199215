"""`python -m interactive_features.bench`: the same as `interactive bench` (bench/harness.py)."""

import sys

from interactive_features.bench.harness import main

sys.exit(main())
