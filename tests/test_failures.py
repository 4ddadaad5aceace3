"""Data failures are refusals (one line naming the file or split and the fix, exit status 2,
no run folder, no MLflow run for input refused before work), and nothing is left in a false
state: a failed checkpoint write, DDP ranks a step apart, a refused probe URI, a missing or
broken store for the report and ``make ui``."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config, mlflow_runs, run_cli, tiny_overrides
from PIL import Image

from alfusion.config_check import ConfigError, check_config, refusal_line
from alfusion.data.checks import check_data
from alfusion.data.folder import ImageFolderSource
from alfusion.data.wds import DatasetUnavailable


def image_folder(root: Path, per_class: int = 6) -> Path:
    for split in ("train", "test"):
        for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), colour).save(root / split / c / f"{i}.png")
    return root


def refused_data(*overrides: str) -> str:
    cfg = check_config(compose_config(*overrides))
    with pytest.raises(DatasetUnavailable) as info:
        check_data(cfg)
    assert isinstance(info.value, ConfigError)  # one line, exit status 2 through the CLI
    return refusal_line(info.value)


def test_listed_data_failures_are_refused_naming_the_file_or_split(tmp_path):
    line = refused_data("dataset=folder", f"dataset.root={tmp_path / 'missing'}")
    assert "dataset.root=" in line and "no such folder" in line

    (tmp_path / "empty/train/a").mkdir(parents=True)
    (tmp_path / "empty/test/a").mkdir(parents=True)
    line = refused_data("dataset=folder", f"dataset.root={tmp_path / 'empty'}")
    assert "split 'train'" in line and "is empty" in line

    root = image_folder(tmp_path / "zero")
    (root / "train/a/3.png").write_bytes(b"")
    line = refused_data("dataset=folder", f"dataset.root={root}")
    assert "train/a/3.png is an empty file (0 bytes): remove or replace it" in line

    line = refused_data("dataset.limit=40")
    assert "too small for the stratified validation split" in line
    assert "search.val_fraction=0.2" in line and "dataset.limit" in line

    line = refused_data("dataset.limit=60", "fewshot_k=8")
    assert line.startswith("[alfusion] fewshot_k=8 needs 8 train images of every class")

    line = refused_data("dataset.test_fraction=0.001")
    assert "dataset.test_fraction=0.001 cannot split" in line

    check_data(check_config(compose_config("dataset.limit=60", "fewshot_k=2")))  # enough


def test_undecodable_files_are_refused_naming_the_file_when_read(tmp_path):
    root = image_folder(tmp_path / "img")
    (root / "train/a/0.png").write_bytes(b"\x89PNG garbage" * 10)
    (root / "train/a/1.png").write_text("not an image\n")
    whole = (root / "train/a/2.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "train/a/2.png")
    whole = (root / "train/a/2.png").read_bytes()
    (root / "train/a/2.png").write_bytes(whole[:len(whole) // 2])
    Image.new("1", (20000, 20000)).save(root / "train/a/3.png")  # 400 Mpixel: a bomb
    source = ImageFolderSource(root, "train")
    for i, why in enumerate(("cannot identify image file", "cannot identify image file",
                             "truncated", "decompression bomb")):
        with pytest.raises(DatasetUnavailable) as info:
            source[i]
        line = refusal_line(info.value)
        assert f"train/a/{i}.png cannot be decoded" in line and why in line, line
        assert line.endswith("remove or replace it")


def test_a_dataloader_worker_error_is_its_own_one_line():
    err = DatasetUnavailable("Caught DatasetUnavailable in DataLoader worker process 0.\n"
                             "Original Traceback (most recent call last):\n  File \"x\"\n"
                             "alfusion.data.wds.DatasetUnavailable: image /d/x.png cannot "
                             "be decoded (truncated): remove or replace it\n")
    assert refusal_line(err) == ("[alfusion] image /d/x.png cannot be decoded (truncated): "
                                 "remove or replace it")


def test_bad_data_through_the_cli_is_one_line_exit_2(tmp_path):
    root = tmp_path / "out"
    proc = run_cli(*tiny_overrides(root, "dataset.limit=40"), check=False, full_error=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "too small for the stratified validation split" in proc.stderr
    assert not (root / "mlflow.db").exists()  # no MLflow run, no model
    assert not [p for p in root.rglob("*") if p.is_file()]  # no run folder

    images = image_folder(tmp_path / "img")
    (images / "train/b/2.png").write_text("not an image\n")
    proc = run_cli(*tiny_overrides(root, "dataset=folder", f"dataset.root={images}",
                                   "dataset.limit=null", "search.validate=false"),
                   check=False, full_error=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [x for x in proc.stderr.splitlines() if x.startswith("[alfusion]")]
    assert len(ours) == 1 and "train/b/2.png cannot be decoded" in ours[0]
    assert "Traceback" not in proc.stderr
    [run] = mlflow_runs(root)  # found during the work: FAILED, with the reason
    assert run.info.status == "FAILED"
    assert "train/b/2.png cannot be decoded" in run.data.tags["alfusion.error"]


def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_leaves_nothing_partial(
        tmp_path, monkeypatch):
    from alfusion import checkpoints

    last = tmp_path / "ckpt/last.rank0.pt"
    checkpoints.save_checkpoint({"step": {"step_count": 5}}, last)

    def short_write(state, path):
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 11520 "
                           "vs 11408")

    monkeypatch.setattr(checkpoints.torch, "save", short_write)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(checkpoints.CheckpointWriteFailed) as info:
        checkpoints.save_checkpoint({"step": {"step_count": 10}}, last)
    line = refusal_line(info.value)
    assert "could not be written: the disk is full (0 MB free)" in line
    assert "unexpected pos" not in line and "resume=true" in line
    assert sorted(p.name for p in last.parent.iterdir()) == ["checksums.rank0.json",
                                                             "last.rank0.pt"]
    monkeypatch.undo()
    assert checkpoints.verify_rank(last) == 5  # the intact one, as it was


def test_ddp_ranks_a_checkpoint_apart_resume_from_the_step_they_share(tmp_path, capsys):
    from alfusion.checkpoints import save_checkpoint, verify_checkpoints

    folder = tmp_path / "run/checkpoints/grid"
    for step in (5, 10):  # rank 0 went one checkpoint further than rank 1, which died
        save_checkpoint({"step": {"step_count": step}}, folder / "last.rank0.pt")
    save_checkpoint({"step": {"step_count": 5}}, folder / "last.rank1.pt")
    assert verify_checkpoints(tmp_path / "run") == {"grid": 5}
    assert "continuing every rank from step 5" in capsys.readouterr().out
    for rank in (0, 1):
        saved = torch.load(folder / f"last.rank{rank}.pt", weights_only=True)
        assert saved["step"]["step_count"] == 5
    assert verify_checkpoints(tmp_path / "run") == {"grid": 5}  # verified again, unchanged


def test_a_crafted_checkpoint_message_never_advises_trusting_it(tmp_path):
    from alfusion.checkpoints import load_tensors

    class Payload:
        def __reduce__(self):
            return builtins.exec, ("print('ran')",)

    torch.save({"step": Payload()}, tmp_path / "crafted.pt")
    with pytest.raises(ConfigError) as info:
        load_tensors(tmp_path / "crafted.pt", "ckpt_path", "FIX")
    text = str(info.value)
    assert "it asks for exec" in text and "never run" in text
    assert "add_safe_globals" not in text and "trust" not in text


def test_a_refused_probe_uri_leaves_no_run_folder(tmp_path):
    from alfusion.app import run

    with pytest.raises(ConfigError, match="runs:/0123456789abcdef"):
        run([f"paths.root={tmp_path}", "task=evaluate",
             "probe_path=runs:/0123456789abcdef/probe.pt"])
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no folder, no empty downloaded/


def test_the_report_and_make_ui_refuse_a_missing_or_broken_store_in_one_line(tmp_path):
    from alfusion.report import check_store, main

    for store, what in ((tmp_path / "none.db", "no MLflow store"),
                        (tmp_path / "text.db", "not a SQLite database")):
        if "text" in store.name:
            store.write_text("hello\n")
        with pytest.raises(SystemExit) as info:
            main(["--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path / "r")])
        assert what in str(info.value.code) and "\n" not in str(info.value.code)
        with pytest.raises(SystemExit) as info:
            check_store(f"sqlite:///{store}", "make ui")
        assert what in str(info.value.code) and "make ui" in str(info.value.code)
    assert not (tmp_path / "none.db").exists()  # nothing created
    assert (tmp_path / "text.db").read_text() == "hello\n"  # left as it is
