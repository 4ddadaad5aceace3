"""What suits the stream output goes to: a terminal gets redrawn bars, a file, a pipe or a
SLURM log a line per 10 % of the work, at least 30 s apart (alfusion/engine/progress.py for
fits; feature extraction's tqdm bar through ``tqdm_options``)."""

from __future__ import annotations

import math
import sys
from typing import TextIO

LINE_EVERY_S = 30.0
LINE_EVERY_FRACTION = 0.1


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def tqdm_options(total: int | None, stream: TextIO | None = None) -> dict:
    """tqdm keyword arguments for a bar on ``stream`` (default stderr): none on a terminal;
    otherwise a redraw per 10 % of ``total`` at least 30 s apart (tqdm needs both)."""
    if on_terminal(stream or sys.stderr):
        return {}
    every = max(1, math.ceil(total * LINE_EVERY_FRACTION)) if total else 1
    # maxinterval: tqdm's monitor thread would otherwise force a redraw every 10 s
    return dict(mininterval=LINE_EVERY_S, miniters=every, maxinterval=math.inf)
