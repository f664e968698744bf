"""``python -m bench.step_speed``."""

import sys

from bench.step_speed.cli import main

if __name__ == "__main__":
    sys.exit(main())
