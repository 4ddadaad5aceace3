"""Progress that suits where the output goes (``trainer.progress_bar``).

On a terminal: Lightning's tqdm bars. In a file, a pipe or a SLURM log every bar redraw would
become text (two per optimiser step), so there ``ProgressLines``, a Lightning progress-bar
callback, writes one line when a fit starts, one when it ends, and between them a line per
10 % of the fit, at least 30 s apart (a fit shorter than that writes two lines). Feature
extraction's tqdm bar follows the same rule (``alfusion.console.tqdm_options``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from alfusion.console import LINE_EVERY_FRACTION, LINE_EVERY_S, on_terminal


def progress_callback(mode) -> ProgressBar | None:
    """The progress display for ``trainer.progress_bar``: ``auto`` (or true): bars on a
    terminal, lines otherwise; ``bars``; ``lines``; false: none. ALFUSION_NO_PROGRESS=1 (CI)
    turns every display off."""
    if mode is False or os.environ.get("ALFUSION_NO_PROGRESS") == "1":
        return None
    if mode == "bars" or (mode in (True, "auto") and on_terminal()):
        return TQDMProgressBar()
    return ProgressLines()


class ProgressLines(ProgressBar):
    """Plain lines for a fit, e.g. ``[alfusion] fit grid (3 configurations): step 400/1000
    (40%), loss 0.412, 21.3 steps/s, 28 s left``. Steps count the whole fit's optimiser steps
    (a resumed fit starts past 0)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.enabled = True
        self.stream = stream
        self.started = self.last_time = 0.0
        self.first = self.last_part = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def write(self, text: str) -> None:
        if self.enabled:
            print(f"[alfusion] {text}", file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def phase(module) -> str:
        """The fit's name for a BankModule: ``fit grid (63 configurations)``."""
        g = len(module.bank)
        return f"fit {module.label} ({g} configuration{'s' * (g != 1)})"

    @staticmethod
    def steps(module) -> tuple[int, int]:
        """(optimiser steps done, the fit's total steps) of a BankModule."""
        return module.core.step_count, module.core.total_steps

    def on_train_start(self, trainer, module) -> None:
        self.started = self.last_time = time.monotonic()
        self.first, total = self.steps(module)
        self.last_part = int(self.first / (LINE_EVERY_FRACTION * total))
        resumed = f", resumed at step {self.first}" if self.first else ""
        self.write(f"{self.phase(module)}: {total} steps{resumed}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step, total = self.steps(module)
        now = time.monotonic()
        part = int(step / (LINE_EVERY_FRACTION * total))  # 10 % parts of the fit done
        if part <= self.last_part or now - self.last_time < LINE_EVERY_S or step >= total:
            return
        rate = (step - self.first) / max(now - self.started, 1e-9)
        left = (total - step) / max(rate, 1e-9)
        self.write(f"{self.phase(module)}: step {step}/{total} ({100 * step // total}%)"
                   f"{self.loss(trainer)}, {rate:.1f} steps/s, {left:.0f} s left")
        self.last_part, self.last_time = part, now

    def on_train_end(self, trainer, module) -> None:
        step, total = self.steps(module)
        took = time.monotonic() - self.started
        done = "done" if step >= total else "stopped"
        self.write(f"{self.phase(module)}: {done} at step {step}/{total} in {took:.1f} s"
                   f"{self.loss(trainer)}")

    @staticmethod
    def loss(trainer) -> str:
        value = trainer.progress_bar_metrics.get("loss")
        return "" if value is None else f", loss {float(value):.4g}"
