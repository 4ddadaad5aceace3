"""Progress that suits where output goes: bars on a terminal, a few plain lines in a log."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_config
from lightning.pytorch.callbacks import TQDMProgressBar

from alfusion.config_check import ConfigError, check_config
from alfusion.engine import TokenData, fit_bank
from alfusion.engine import progress as progress_module
from alfusion.engine.progress import ProgressLines, progress_callback
from alfusion.probes import LinearProbe
from alfusion.protocol import HParams


def test_cli_without_a_terminal_writes_a_few_lines_and_the_summary(tmp_path):
    # As `make run > log` or a SLURM job: output to pipes, progress left at its default.
    env = {k: v for k, v in os.environ.items() if k != "ALFUSION_NO_PROGRESS"}
    overrides = [o for o in TINY if not o.startswith("trainer.progress_bar")]
    proc = subprocess.run(
        [sys.executable, "-m", "alfusion", *overrides, "train.min_steps=200", "search=quick",
         f"paths.root={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # At most 12 lines per fit (slow machines included); Lightning's bars would redraw twice
    # per step here: about 70 KB for these two 200-step fits
    assert len(proc.stdout) + len(proc.stderr) < 8000, (len(proc.stdout), len(proc.stderr))
    assert "\r" not in proc.stdout
    lines = proc.stdout.splitlines()
    fits = [line for line in lines if line.startswith("[alfusion] fit ")]
    assert re.fullmatch(r"\[alfusion\] fit grid \(3 configurations\): \d+ steps", fits[0])
    assert any(line.startswith("[alfusion] fit train (1 configuration): done at step 200/200")
               for line in lines), proc.stdout
    assert any("| alf | test balanced accuracy" in line for line in lines), proc.stdout


def test_a_terminal_gets_lightnings_bars_and_a_file_gets_lines(monkeypatch, tmp_path):
    monkeypatch.delenv("ALFUSION_NO_PROGRESS")
    main, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        assert isinstance(progress_callback("auto"), TQDMProgressBar)
    os.close(main)
    with open(tmp_path / "log.txt", "w") as log:
        monkeypatch.setattr(sys, "stdout", log)
        assert isinstance(progress_callback("auto"), ProgressLines)
        assert isinstance(progress_callback("bars"), TQDMProgressBar)
        assert progress_callback(False) is None
        monkeypatch.setenv("ALFUSION_NO_PROGRESS", "1")  # CI: nothing at all
        assert progress_callback("auto") is None


def test_progress_lines_come_every_tenth_of_the_fit(monkeypatch, tmp_path, capsys):
    # Without the 30 s spacing (a fit of a second), one line per 10 % between start and end.
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    monkeypatch.delenv("ALFUSION_NO_PROGRESS")
    cfg = compose_config("train.min_steps=100", "train.epochs=1", "trainer.progress_bar=lines",
                         f"paths.root={tmp_path}")
    x, y = torch.randn(64, 12), torch.arange(64) % 3
    fit_bank([HParams(0.01, 0.0, 0.0)], lambda hp: LinearProbe(12, 3), TokenData(x, y), 3, cfg)
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if ": step " in line]
    total = int(re.fullmatch(r"\[alfusion\] fit train \(1 configuration\): (\d+) steps",
                             lines[0]).group(1))
    assert [s.split("(")[2].split(")")[0] for s in steps] == [f"{10 * i}%" for i in range(1, 10)]
    assert "s left" in steps[0] and "steps/s" in steps[0]
    assert lines[-1].startswith(
        f"[alfusion] fit train (1 configuration): done at step {total}/{total}")
    assert len(lines) == 11


def test_an_unknown_progress_setting_is_refused_before_any_work():
    cfg = compose_config("trainer.progress_bar=sometimes")
    with pytest.raises(ConfigError, match="trainer.progress_bar='sometimes'.*auto, bars, lines"):
        check_config(cfg)
