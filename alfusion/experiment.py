"""What one command does: extract features, train with the search, or evaluate a saved probe."""

from __future__ import annotations

import contextlib
from pathlib import Path

from alfusion import tracking
from alfusion.analysis import hooks as analysis
from alfusion.api.mlflow_model import log_probe_model
from alfusion.data import class_names
from alfusion.data.extract import dataset_digest, load_or_extract
from alfusion.distributed import is_global_zero, join_ranks, resolve_device, stop_ranks
from alfusion.inputs import analysis_tokens, backbone_checksums, test_inputs, train_inputs
from alfusion.metrics import classification_metrics, num_classes_of
from alfusion.predict import run_predict
from alfusion.probe_files import load_probe, refuse_overrides, save_probe, saved_probe
from alfusion.probes import build_probe
from alfusion.protocol import HParams
from alfusion.resume import interrupted_line, open_run_state
from alfusion.search import expand_grid, run_search


def probe_factory(cfg, token_set, dims, num_classes, num_tokens):
    def make(hp: HParams):
        return build_probe(cfg.probe, token_set, dims, num_classes, num_tokens,
                           attn_drop=hp.dropout)
    return make


def run_train(cfg, run_dir: Path) -> dict:
    """Train with the search, test once, log everything; the same flow for every mode."""
    analysis.requested(cfg)  # a misspelt analysis fails before any work
    device = resolve_device(cfg.device)
    state, resuming = open_run_state(cfg, run_dir)
    logger = tracking.make_logger(cfg, run_id=state.data.get("mlflow_run_id"))
    status = "FAILED"
    try:
        if logger is not None and not resuming:
            state.data["mlflow_run_id"] = logger.run_id
            state.save()
            tracking.log_config(logger, cfg, state.run_dir, {
                split: dataset_digest(cfg, split) for split in ("train", "test")})
            if state.orphan_run_id:  # the killed run this folder held before
                tracking.mark_killed(logger, state.orphan_run_id)
        elif resuming:
            tracking.set_tag(logger, "resumed_in", str(run_dir))
        inputs = train_inputs(cfg, device)
        if "storage" in inputs:  # cached: in memory or streamed from disk
            if not resuming:  # params are written once
                tracking.log_params(logger, {"cached_features": inputs["storage"]})
            tracking.set_tag(logger, "cached_features", inputs["storage"])
        train, test = inputs["train"], inputs["test"]
        num_classes = num_classes_of(cfg, train.labels, test.labels)
        make_probe = probe_factory(cfg, inputs["token_set"], inputs["dims"], num_classes,
                                   inputs["num_tokens"])
        configs = expand_grid(cfg.search, attentive=cfg.probe.kind == "attentive")
        result = run_search(make_probe, configs, train, test, num_classes, cfg, state,
                            resuming, logger)
        if not is_global_zero():
            status = "FINISHED"
            return {}
        join_ranks()  # a rank that failed fails the run
        summary = write_results(cfg, state.run_dir, logger, result, inputs, num_classes)
        state.data["finished"] = True
        state.save()
        status = "FINISHED"
        print(f"[alfusion] {cfg.mode.name} {cfg.dataset.name} | {cfg.backbone.name} | "
              f"{cfg.probe.name} | test balanced accuracy {summary['test']['bal_acc']:.4f} "
              f"(chosen {result.best.name}; results in {state.run_dir})")
        return summary
    except Exception as err:  # the reason stays with the FAILED run
        with contextlib.suppress(Exception):  # never over the real error
            tracking.set_tag(logger, "alfusion.error", " ".join(str(err).split())[:4000])
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        print(interrupted_line(state.run_dir, logger), flush=True)
        raise
    finally:
        if status != "FINISHED":
            stop_ranks()  # else they wait in a collective for the process group's timeout
        tracking.finish(logger, status)


def write_results(cfg, run_dir: Path, logger, result, inputs: dict, num_classes: int) -> dict:
    """results.json, probe.pt, per-class recall, analyses, the run's MLflow summary and its
    MLflow model (runs:/<run id>/model, registered with logger.register_model)."""
    token_set, probe = inputs["token_set"], result.model
    summary = dict(
        mode=cfg.mode.name, dataset=cfg.dataset.name, backbone=cfg.backbone.name,
        probe=cfg.probe.name, layers=list(token_set.layers), tokens=token_set.tokens,
        num_tokens=inputs["num_tokens"], num_classes=num_classes, chosen=result.best.__dict__,
        val={k: v for k, v in result.val.items() if k != "per_class_recall"},
        test={k: v for k, v in result.test.items() if k != "per_class_recall"},
        fit=dict(steps=result.steps, batch_size=result.batch_size, samples=result.fit_samples,
                 world=result.world),
        probe_params=sum(p.numel() for p in probe.parameters()),
        seconds=dict(inputs=round(inputs["seconds"], 2), search=round(result.search_seconds, 2),
                     fit=round(result.fit_seconds, 2)),
        grid=result.grid, run_dir=str(run_dir),
        mlflow_run_id=logger.run_id if logger else None)
    encoder = inputs["encoder"]
    checksums = backbone_checksums(encoder)
    if checksums is not None:
        summary["backbone_checksum"] = checksums
        for when, value in checksums.items():
            tracking.set_tag(logger, f"backbone_sha256_{when}", value)
    save_probe(run_dir / "probe.pt", probe, cfg, summary, inputs["dims"],
               encoder.backbone if encoder is not None and encoder.trainable else None)
    tracking.log_artifact(logger, run_dir / "probe.pt")  # probe_path=runs:/<run id>/probe.pt
    x_test = analysis_tokens(inputs["test"], resolve_device(cfg.device))
    summary["analysis"] = analysis.analyse_run(cfg, run_dir, logger, probe, token_set,
                                               x_test, summary, resolve_device(cfg.device))
    tracking.log_summary(logger, run_dir, summary, {
        "fit/steps": result.steps, "fit/samples": result.fit_samples,
        "probe/params": summary["probe_params"], "time/search_s": result.search_seconds,
        "time/fit_s": result.fit_seconds, "time/inputs_s": inputs["seconds"]})
    summary["model"] = log_probe_model(  # after the metrics: the model lists them
        logger, cfg, run_dir / "probe.pt", summary, class_names(cfg.dataset, num_classes))
    if summary["model"]:
        tracking.log_artifact(logger, tracking.write_json(run_dir / "results.json", summary))
    tracking.log_artifact(logger, tracking.write_json(
        run_dir / "per_class_recall.json",
        dict(val=result.val.get("per_class_recall"), test=result.test["per_class_recall"])))
    return summary


def run_evaluate(cfg, run_dir: Path) -> dict:
    """Score a saved probe (``probe_path=``: a file or an MLflow URI) on its test split,
    without training, with the backbone it was trained with (a fine-tuned one included) and
    in its own mode."""
    refuse_overrides("evaluate")
    path, saved, saved_cfg = load_probe(cfg, run_dir)
    device = resolve_device(cfg.device)
    test, token_set = test_inputs(saved_cfg, saved.get("backbone_state_dict"), device)
    logits, labels = test.logits(saved_probe(saved, saved_cfg, token_set, device))
    metrics = classification_metrics(logits[0], labels, saved["num_classes"])
    metrics.pop("per_class_recall")
    print(f"[alfusion] evaluate {cfg.probe_path} ({saved_cfg.mode.name} "
          f"{saved_cfg.dataset.name} | {saved_cfg.backbone.name} | {saved_cfg.probe.name}): "
          f"{metrics}")
    tracking.write_json(run_dir / "evaluation.json", dict(
        probe_path=str(cfg.probe_path), probe_file=str(path), mode=saved_cfg.mode.name,
        dataset=saved_cfg.dataset.name, backbone=saved_cfg.backbone.name,
        probe=saved_cfg.probe.name, test=metrics))
    return metrics


def run_extract(cfg, run_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    out = {}
    for split in cfg.extract.get("splits", ["train", "test"]):
        entry = load_or_extract(cfg, split, device)
        out[split] = dict(path=str(entry.path), rows=len(entry))
        print(f"[alfusion] {split}: {len(entry)} rows in {entry.path}")
    return out


TASKS = {"train": run_train, "extract": run_extract, "evaluate": run_evaluate,
         "predict": run_predict}
