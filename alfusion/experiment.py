"""What one command does: extract features, train with the search, or evaluate a saved probe."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from alfusion import tracking
from alfusion.analysis import hooks as analysis
from alfusion.data.extract import load_or_extract
from alfusion.metrics import classification_metrics
from alfusion.probes import build_probe, build_token_set
from alfusion.search import expand_grid, run_search
from alfusion.training import predict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def split_tokens(cfg, split: str, device: torch.device):
    """(tokens (N, T, D) or (N, F), labels (N,), token set, entry) of a cached split."""
    entry = load_or_extract(cfg, split, device)
    if cfg.dataset.get("num_classes") is None and entry.meta.get("num_classes"):
        with open_dict(cfg):  # dataset=wds|folder: classnames.txt or the class folders decide
            cfg.dataset.num_classes = entry.meta["num_classes"]
    token_set = build_token_set(cfg.probe, num_layers=len(entry.dims))
    # fp16 onto the device first: selection, normalisation and fp32 happen there.
    names = ("cls", "ap", "tokens", "regions")
    arrays = {n: entry.tensor(n, device) for n in names if entry.has(n)}
    x = token_set.from_arrays(arrays, entry.dims)
    return x, entry.tensor("labels", device).long(), token_set, entry


def num_classes_of(cfg, *labels: torch.Tensor) -> int:
    n = cfg.dataset.get("num_classes") or int(max(int(y.max()) for y in labels) + 1)
    bad = [int(y.max()) for y in labels if int(y.max()) >= n]
    if bad:
        raise ValueError(f"label {max(bad)} outside the {n} classes of dataset "
                         f"{cfg.dataset.name}: check dataset.num_classes")
    return n


def probe_factory(cfg, token_set, dims, num_classes, num_tokens):
    def make(hp):
        return build_probe(cfg.probe, token_set, dims, num_classes, num_tokens,
                           attn_drop=hp.dropout)
    return make


def run_train(cfg, run_dir: Path) -> dict:
    """Cached mode: features from the cache, the search, one test evaluation, all logged.
    ``mode=end2end`` and fine-tuning probes train through the backbone instead."""
    if cfg.mode == "end2end" or cfg.probe.get("finetune"):
        from alfusion.end2end_run import run_end2end

        return run_end2end(cfg, run_dir)
    if cfg.mode != "cached":
        raise ValueError(f"unknown mode {cfg.mode!r}: use cached or end2end")
    device = resolve_device(cfg.device)
    analysis.requested(cfg)  # a misspelt analysis fails before any work
    logger = tracking.make_logger(cfg)
    ok = False
    try:
        tracking.log_config(logger, cfg, run_dir)
        t0 = time.perf_counter()
        x_train, y_train, token_set, entry = split_tokens(cfg, "train", device)
        x_test, y_test, _, _ = split_tokens(cfg, "test", device)
        features_seconds = time.perf_counter() - t0
        num_classes = num_classes_of(cfg, y_train, y_test)
        num_tokens = x_train.shape[1] if x_train.dim() == 3 else token_set.num_tokens()
        make_probe = probe_factory(cfg, token_set, entry.dims, num_classes, num_tokens)
        configs = expand_grid(cfg.search, attentive=cfg.probe.kind == "attentive")
        result = run_search(make_probe, configs, (x_train, y_train), (x_test, y_test),
                            num_classes, cfg, logger=logger)
        probe = result.model.probe
        summary = dict(
            dataset=cfg.dataset.name, backbone=cfg.backbone.name, probe=cfg.probe.name,
            layers=list(token_set.layers), tokens=token_set.tokens, num_tokens=num_tokens,
            num_classes=num_classes, chosen=result.best.__dict__,
            val={k: v for k, v in result.val.items() if k != "per_class_recall"},
            test={k: v for k, v in result.test.items() if k != "per_class_recall"},
            steps=result.steps, fit_samples=result.fit_samples,
            probe_params=sum(p.numel() for p in probe.parameters()),
            seconds=dict(features=round(features_seconds, 2),
                         search=round(result.search_seconds, 2),
                         fit=round(result.fit_seconds, 2)),
            grid=result.grid, run_dir=str(run_dir),
            mlflow_run_id=logger.run_id if logger else None,
        )
        save_probe(run_dir / "probe.pt", probe, cfg, summary, entry.dims)
        summary["analysis"] = analysis.analyse_run(cfg, run_dir, logger, probe, token_set,
                                                   x_test, summary, device)
        tracking.log_summary(logger, run_dir, summary, {
            "fit/steps": result.steps, "fit/samples": result.fit_samples,
            "probe/params": summary["probe_params"], "time/search_s": result.search_seconds,
            "time/fit_s": result.fit_seconds, "time/features_s": features_seconds})
        tracking.log_artifact(logger, tracking.write_json(
            run_dir / "per_class_recall.json",
            dict(val=result.val.get("per_class_recall"), test=result.test["per_class_recall"])))
        ok = True
        print(f"[alfusion] {cfg.dataset.name} | {cfg.backbone.name} | {cfg.probe.name} | "
              f"test balanced accuracy {summary['test']['bal_acc']:.4f} "
              f"(chosen {result.best.name}; results in {run_dir})")
        return summary
    finally:
        tracking.finish(logger, ok)


def save_probe(path: Path, probe: torch.nn.Module, cfg, summary: dict, dims: list[int]) -> None:
    """The trained probe with what rebuilds it: state dict, resolved config, sizes."""
    torch.save(dict(state_dict=probe.state_dict(), config=OmegaConf.to_container(cfg, resolve=True),
                    dims=dims, num_classes=summary["num_classes"],
                    num_tokens=summary["num_tokens"], chosen=summary["chosen"]), path)


def run_evaluate(cfg, run_dir: Path) -> dict:
    """Evaluate a saved probe (``probe_path=``) on the test split, without training."""
    if not cfg.get("probe_path"):
        raise ValueError("task=evaluate needs probe_path=<run folder>/probe.pt")
    saved = torch.load(cfg.probe_path, map_location="cpu", weights_only=False)
    saved_cfg = OmegaConf.create(saved["config"])
    saved_cfg.paths = cfg.paths
    device = resolve_device(cfg.device)
    x_test, y_test, token_set, _ = split_tokens(saved_cfg, "test", device)
    probe = build_probe(saved_cfg.probe, token_set, saved["dims"], saved["num_classes"],
                        saved["num_tokens"], attn_drop=saved["chosen"]["dropout"])
    probe.load_state_dict(saved["state_dict"])
    metrics = classification_metrics(predict(probe.to(device), x_test), y_test,
                                     saved["num_classes"])
    metrics.pop("per_class_recall")
    print(f"[alfusion] evaluate {cfg.probe_path}: {metrics}")
    tracking.write_json(run_dir / "evaluation.json", dict(probe_path=str(cfg.probe_path),
                                                           test=metrics))
    return metrics


def run_extract(cfg, run_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    out = {}
    for split in cfg.extract.get("splits", ["train", "test"]):
        entry = load_or_extract(cfg, split, device)
        out[split] = dict(path=str(entry.path), rows=len(entry))
        print(f"[alfusion] {split}: {len(entry)} rows in {entry.path}")
    return out


TASKS = {"train": run_train, "extract": run_extract, "evaluate": run_evaluate}
