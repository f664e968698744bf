"""Distillation step speed: this project's trainer step against the paper's own code, and a training epoch beside
a CPU-heavy process; writes bench/results/step_speed.{md,json}.

    python -m bench.step_speed --paper-code ../paper-ReDistill        # the issue's three pairs, ~15 min on 2 cores
    python -m bench.step_speed --pages-only --remarks bench/results/step_speed_remarks.md

The paper's code (github.com/mengtang-lab/ReDistill) is no dependency: its side runs in its own isolated process
from the folder given (``paper.py``) and is skipped, with one line, when the folder is absent or incomplete.
Our side is the trainer's step (``ours.py``), by default and with each speed change alone (``runtime.*`` keys).
Parts (a pair, a contention epoch) are kept in RUN_DIR/state.json as they finish; a rerun skips them.
"""

from bench.step_speed.cli import main

__all__ = ["main"]
