"""``python -m bench``: the mode-coverage reproduction (bench/reproduce.py)."""

import sys

from bench.reproduce import main

sys.exit(main())
