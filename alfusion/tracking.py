"""MLflow tracking through Lightning's MLFlowLogger: one run per experiment command."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Param
from omegaconf import OmegaConf

MAX_PARAM_LENGTH = 500
SERVER_TIMEOUT_S = 5
# Tracking servers found unreachable in this process: finish() does not call them again.
_dead_servers: set[str] = set()


class TrackingServerUnreachable(RuntimeError):
    """The http(s) tracking server does not answer; the message says how to fix it."""


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Refuse an http(s) tracking URI whose server does not answer a plain GET of
    ``<uri>/health`` within ``timeout`` seconds (MLflow itself would retry for minutes).
    Any HTTP answer, even an error status, counts as a live server; other URIs pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:  # refused, timed out, unknown host, bad URL
        _dead_servers.add(uri)
        raise TrackingServerUnreachable(
            f"the MLflow tracking server at logger.tracking_uri={uri} does not answer ({err}). "
            "Start it (e.g. `mlflow server --port 5000`), or log to the default SQLite store "
            "(leave logger.tracking_uri unset), or run without tracking (logger=none)") from err


def make_logger(cfg, run_id: str | None = None) -> MLFlowLogger | None:
    """The run's MLflow logger (SQLite store under outputs/ by default), or None (also on every
    DDP rank but rank 0). ``run_id`` continues that run (resume) instead of starting one."""
    from alfusion.distributed import is_global_zero

    log_cfg = cfg.logger
    if log_cfg.get("name", "mlflow") != "mlflow" or not is_global_zero():
        return None
    uri = log_cfg.tracking_uri
    check_server(uri)  # seconds, before any work, instead of MLflow's minutes of retries
    artifacts = log_cfg.get("artifact_location")
    if uri.startswith(("http://", "https://")) and artifacts and "://" not in artifacts:
        artifacts = None  # a server keeps artifacts in its own artifact root, not a local folder
    if artifacts and "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = Path(artifacts).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    tags = {k: str(v) for k, v in (log_cfg.get("tags") or {}).items()}
    if sweep_id() and "sweep" not in tags:
        tags["sweep"] = sweep_id()  # python -m alfusion.report --sweep <id> selects the sweep
    return MLFlowLogger(experiment_name=log_cfg.experiment, run_name=log_cfg.get("run_name"),
                        tracking_uri=uri, tags=tags or None, artifact_location=artifacts,
                        run_id=run_id)


def sweep_id() -> str | None:
    """The Hydra multirun folder's name (e.g. 2026-01-31_12-00-00) in a sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def flat_params(cfg) -> dict[str, str]:
    """The resolved config flattened to ``a/b/c`` keys, values cut to MLflow's limits."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}/")
        else:
            out[prefix.rstrip("/")] = str(node)[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def log_config(logger: MLFlowLogger | None, cfg, run_dir: Path) -> None:
    """Flattened config as params, the whole resolved YAML as an artifact."""
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log_params(logger, flat_params(cfg))
    log_artifact(logger, path)


def log_params(logger: MLFlowLogger | None, params: dict) -> None:
    if logger is None:
        return
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        logger.experiment.log_batch(logger.run_id, params=items[i:i + 100])


def log_metrics(logger: MLFlowLogger | None, metrics: dict[str, float], step: int = 0) -> None:
    if logger is not None:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(logger: MLFlowLogger | None, path: Path, folder: str | None = None) -> None:
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, str(path), folder)


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def log_summary(logger: MLFlowLogger | None, run_dir: Path, summary: dict,
                extra_metrics: dict[str, float]) -> None:
    """A finished run's val/* and test/* metrics, ``extra_metrics``, the chosen
    hyper-parameters (params chosen/*) and results.json (run folder and artifact)."""
    metrics = {f"{split}/{k}": v for split in ("val", "test") for k, v in summary[split].items()}
    log_metrics(logger, {**metrics, **extra_metrics})
    log_params(logger, {f"chosen/{k}": v for k, v in summary["chosen"].items()})
    log_artifact(logger, write_json(run_dir / "results.json", summary))


def log_curve(logger: MLFlowLogger | None, key: str, values: list[float]) -> None:
    """A whole curve (value i at step i + 1), in batches of MLflow's 1000 metrics."""
    if logger is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [Metric(key, float(v), now, i + 1) for i, v in enumerate(values)]
    for i in range(0, len(points), 1000):
        logger.experiment.log_batch(logger.run_id, metrics=points[i:i + 1000])


def set_tag(logger: MLFlowLogger | None, key: str, value: str) -> None:
    if logger is not None:
        logger.experiment.set_tag(logger.run_id, key, value)


def mark_killed(logger: MLFlowLogger | None, run_id: str) -> None:
    """A run left RUNNING by a killed process, whose folder a new run now takes: KILLED."""
    if logger is not None and logger.experiment.get_run(run_id).info.status == "RUNNING":
        logger.experiment.set_terminated(run_id, "KILLED")


def finish(logger: MLFlowLogger | None, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED.

    On the way out (often after an error) a server that is gone is not retried: one try with
    a short timeout, and a failure to mark the run is printed, not raised over the real error.
    """
    if logger is None:
        return
    uri = logger._tracking_uri or ""
    if uri in _dead_servers:
        return
    if not uri.startswith(("http://", "https://")):
        logger.experiment.set_terminated(logger.run_id, status)
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                            "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                      MLFLOW_HTTP_REQUEST_TIMEOUT=str(SERVER_TIMEOUT_S))
    try:
        logger.experiment.set_terminated(logger.run_id, status)
    except Exception as err:  # the server went away during the run
        print(f"[alfusion] could not mark MLflow run {logger.run_id} at {uri} {status}: {err}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_artifact_uri(location: str) -> bool:
    """Whether ``location`` is a URI for MLflow to resolve (``runs:/<run_id>/probe.pt``,
    ``models:/...``, ``mlflow-artifacts:/...``, ``s3://...``) rather than a local path."""
    scheme, sep, _ = str(location).partition(":/")
    return bool(sep) and len(scheme) > 1 and scheme.replace("-", "").replace("+", "").isalnum()


def download_artifact(uri: str, tracking_uri: str | None, dst: Path, key: str,
                      fix: str) -> Path:
    """The local copy, under ``dst``, of the artifact that MLflow resolves ``uri`` to, read
    through the tracking store at ``tracking_uri``. An unreachable server, an unknown run or
    model and a missing artifact each fail at once with a message naming ``key`` and ``fix``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not tracking_uri:
        raise ValueError(f"{key}={uri} is read through MLflow, which needs a tracking URI: use "
                         "logger=mlflow with logger.tracking_uri=<the store of that run>")
    check_server(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///"))
        if not store.is_file():  # MLflow would create an empty store and then miss the run
            raise FileNotFoundError(f"{key}={uri}: there is no MLflow store at {store} "
                                    f"(logger.tracking_uri={tracking_uri}); set "
                                    "logger.tracking_uri to the store the run logged to")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    except MlflowException as err:
        raise FileNotFoundError(f"{key}={uri} cannot be downloaded from the MLflow store at "
                                f"{tracking_uri}: {err.message} ({err.error_code}). Check the "
                                f"run id and the artifact's path (the run's Artifacts tab "
                                f"lists them), and logger.tracking_uri; {fix}") from err
