#!/usr/bin/env python3
"""Notebook baseline vs this project's training path: see trainer/benchmark.py.

Usage: scripts/benchmark.py [--idx_dir=DIR] [--job=subset|full|none] [--notebook=extrapolate|full]
                            [--examples=N] [--runs=N] [--json_out=FILE]
Same as `python -m trainer.benchmark`; runnable from anywhere with the project's python.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.benchmark import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
