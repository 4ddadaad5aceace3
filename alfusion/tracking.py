"""MLflow tracking through Lightning's MLFlowLogger: one run per experiment command."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Param
from omegaconf import OmegaConf

from alfusion.config_check import ConfigError, MissingFile

MAX_PARAM_LENGTH = 500
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# A saved view of the runs table (MLflow 3.17's UI keeps saved views as experiment tags
# mlflow.sharedViewState.<key>, {name, createdAt, updatedAt, state: JSON} and opens one with
# ?viewStateShareKey=<key>): the test metric first, sorted by it, then the data, then more
# metrics (in this order the first four columns fit beside the UI's side panels at 1600 px).
RUNS_VIEW_KEY = "alfusion"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_NAME = "alfusion: test balanced accuracy"
_RUNS_COLUMNS = ["metrics.`test/bal_acc`", "attributes.`Dataset`", "metrics.`test/acc1`",
                 "metrics.`val/bal_acc`", "metrics.`probe/params`"]
RUNS_VIEW = dict(selectedColumns=_RUNS_COLUMNS, columnOrder=_RUNS_COLUMNS,
                 columnWidths={"metrics.`test/bal_acc`": 130},
                 orderByKey="metrics.`test/bal_acc`", orderByAsc=False)
SERVER_TIMEOUT_S = 5
# Tracking servers found unreachable in this process: finish() does not call them again.
_dead_servers: set[str] = set()


class TrackingServerUnreachable(ConfigError, RuntimeError):
    """The http(s) tracking server does not answer; the message says how to fix it (a refused
    setting: one line, exit status 2)."""


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Refuse an http(s) tracking URI whose server does not answer a plain GET of MLflow's
    REST API (``experiments/get-by-name``) within ``timeout`` seconds (MLflow itself would retry
    for minutes), or answers it but not as MLflow does (JSON with an experiment or an MLflow
    error code; a 401/403 of a server behind authentication counts as MLflow). Other URIs
    pass."""
    if not uri.startswith(("http://", "https://")):
        return
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as response:
            status, body = response.status, response.read(65536)
    except urllib.error.HTTPError as err:  # it answered, with an error status
        status, body = err.code, err.read(65536)
    except (OSError, ValueError) as err:  # refused, timed out, unknown host, bad URL
        _dead_servers.add(uri)
        raise TrackingServerUnreachable(
            f"the MLflow tracking server at logger.tracking_uri={uri} does not answer ({err}). "
            "Start it (e.g. `mlflow server --port 5000`), or log to the default SQLite store "
            "(leave logger.tracking_uri unset), or run without tracking (logger=none)") from err
    if status in (401, 403) or is_mlflow_answer(body):
        return
    _dead_servers.add(uri)
    raise TrackingServerUnreachable(
        f"logger.tracking_uri={uri} answers HTTP but is not an MLflow tracking server (GET "
        f"{probe} gave HTTP {status} without MLflow's JSON). Point it at an MLflow server "
        "(`mlflow server` serves one at http://HOST:5000, the REST API under /api/2.0/mlflow), "
        "or leave it unset for the default SQLite store, or run with logger=none")


def is_mlflow_answer(body: bytes) -> bool:
    """Whether a REST answer is MLflow's: a JSON object with an experiment or an error code."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and ("experiment" in data or "error_code" in data)


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
        prepare_sqlite_store(uri, log_cfg.experiment, artifacts)
    tags = {k: str(v) for k, v in (log_cfg.get("tags") or {}).items()}
    if sweep_id() and "sweep" not in tags:
        tags["sweep"] = sweep_id()  # python -m alfusion.report --sweep <id> selects the sweep
    return MLFlowLogger(experiment_name=log_cfg.experiment, run_name=log_cfg.get("run_name"),
                        tracking_uri=uri, tags=tags or None, artifact_location=artifacts,
                        run_id=run_id)


def prepare_sqlite_store(uri: str, experiment: str, artifacts: str | None) -> None:
    """Create a SQLite store's tables and ``experiment`` under a file lock beside the database
    (``<db>.lock``): two runs that start together against a new store would otherwise both
    create MLflow's tables, and one fail ("table ... already exists")."""
    import fcntl

    from mlflow.tracking import MlflowClient

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=artifacts)


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


def log_config(logger: MLFlowLogger | None, cfg, run_dir: Path, digests: dict[str, str]
               ) -> None:
    """Flattened config as params, the whole resolved YAML as an artifact; the experiment
    marked as model training and the run's data as dataset inputs (what the UI shows), each
    split with its digest from ``digests`` ({split: digest})."""
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log_params(logger, flat_params(cfg))
    log_artifact(logger, path)
    mark_model_training(logger)
    log_datasets(logger, cfg, digests)


def mark_model_training(logger: MLFlowLogger | None) -> None:
    """Mark the experiment as model training for MLflow's UI, keeping what a user set:
    ``mlflow.experimentKind=custom_model_development`` (the tag the UI writes when a user picks
    "Machine learning" as the experiment's kind) and the saved runs view ``RUNS_VIEW``."""
    if logger is None:
        return
    client, experiment_id = logger.experiment, logger.experiment_id
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if RUNS_VIEW_TAG not in tags:
        now = int(time.time() * 1000)
        client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG, json.dumps(dict(
            name=RUNS_VIEW_NAME, createdAt=now, updatedAt=now, state=json.dumps(RUNS_VIEW))))


def runs_view_url(tracking_uri: str, ui_url: str, experiment: str = "alfusion") -> str:
    """The UI address that opens ``experiment``'s runs table in the saved view (the UI's
    "Model training" side, not GenAI); the UI's home when the experiment does not exist yet."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///") and \
            not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return ui_url  # no runs yet (and no store to create here)
    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return ui_url
    return (f"{ui_url.rstrip('/')}/#/experiments/{found.experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}")


def dataset_source(dataset_cfg):
    """Where the images come from, as an MLflow dataset source: a local folder or URL
    (MLflow resolves which), the Hugging Face copy, or the data bundled in a package."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if dataset_cfg.get("root") or dataset_cfg.get("hf_name"):
        from alfusion.data.wds import dataset_base

        base = dataset_base(dataset_cfg) if dataset_cfg.source == "wds" else \
            str(Path(dataset_cfg.root).expanduser().resolve())
        return resolve_dataset_source(base)
    return CodeDatasetSource({"dataset.source": str(dataset_cfg.source)})


def log_datasets(logger: MLFlowLogger | None, cfg, digests: dict[str, str]) -> None:
    """Each split the run reads as an MLflow dataset input: the dataset's name, the split as
    its context (``mlflow.data.context``), its digest from ``digests`` ({split: digest})."""
    if logger is None:
        return
    import warnings

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        source = dataset_source(cfg.dataset)
    inputs = [DatasetInput(MetaDataset(source, name=str(cfg.dataset.name),
                                       digest=digest)._to_mlflow_entity(),
                           [InputTag(MLFLOW_DATASET_CONTEXT, split)])
              for split, digest in digests.items()]
    logger.experiment.log_inputs(logger.run_id, datasets=inputs)


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


def close_orphans(log_cfg, run_ids: list[str], reason: str | None = None) -> None:
    """Mark KILLED those of ``run_ids`` (runs of killed processes) that are still RUNNING in
    the store of ``log_cfg``; ids the store does not hold are skipped. ``reason``: why, kept
    as the run's tag ``alfusion.killed_reason``."""
    if not run_ids or log_cfg.get("name", "mlflow") != "mlflow":
        return
    uri = log_cfg.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return
    check_server(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                if reason:
                    client.set_tag(run_id, "alfusion.killed_reason", reason[:4000])
                client.set_terminated(run_id, "KILLED")
                print(f"[alfusion] MLflow run {run_id} of a killed run of this config: marked "
                      "KILLED", flush=True)
        except Exception:  # not in this store (another logger.tracking_uri)
            continue


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


@contextmanager
def store_of(tracking_uri: str):
    """MLflow's global tracking and registry URIs set to ``tracking_uri`` for a moment (and
    restored): MLflow resolves models:/ URIs (a registered version, a logged model behind
    runs:/<run id>/model) through the global ones, whatever URI its caller passes."""
    import mlflow.tracking._model_registry.utils as registry
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = registry._registry_uri
    registry.set_registry_uri(tracking_uri)
    try:
        with _use_tracking_uri(tracking_uri):
            yield
    finally:
        registry._registry_uri = saved


def download_artifact(uri: str, tracking_uri: str | None, dst: Path, key: str,
                      fix: str) -> Path:
    """The local copy, under ``dst``, of the artifact that MLflow resolves ``uri`` to, read
    through the tracking store at ``tracking_uri``. An unreachable server, an unknown run or
    model and a missing artifact each fail at once with a message naming ``key`` and ``fix``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not tracking_uri:
        raise ConfigError(f"{key}={uri} is read through MLflow, which needs a tracking URI: use "
                         "logger=mlflow with logger.tracking_uri=<the store of that run>")
    check_server(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///"))
        if not store.is_file():  # MLflow would create an empty store and then miss the run
            raise MissingFile(f"{key}={uri}: there is no MLflow store at {store} "
                                    f"(logger.tracking_uri={tracking_uri}); set "
                                    "logger.tracking_uri to the store the run logged to")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with store_of(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                            tracking_uri=tracking_uri,
                                                            registry_uri=tracking_uri))
    except MlflowException as err:
        raise MissingFile(f"{key}={uri} cannot be downloaded from the MLflow store at "
                                f"{tracking_uri}: {err.message} ({err.error_code}). Check the "
                                f"run id and the artifact's path (the run's Artifacts tab "
                                f"lists them), and logger.tracking_uri; {fix}") from err



class _PyfuncSaver:
    """mlflow.pyfunc as the flavour Model.log saves with, minus the serving check: Model.log
    skips running the input example through the loaded model (seconds: the backbone is
    built) only when its flavour's save_model takes ``validate_serving_input``, which
    mlflow.pyfunc.save_model does not."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


@contextmanager
def quiet_model_logging():
    """Without what MLflow prints while it saves a model (an INFO line on the input example, a
    progress bar for its own local copy): a run's output stays its own lines."""
    import logging

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level, bar = pyfunc_log.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    pyfunc_log.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        pyfunc_log.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def log_model(logger: MLFlowLogger | None, python_model, *, name: str = "model",
              artifacts: dict[str, str] | None = None, signature=None, input_example=None,
              pip_requirements: list[str] | None = None, metadata: dict | None = None,
              register_as: str | None = None):
    """Log ``python_model`` (a python_function model: a PythonModel, or the path of the file
    that sets one, MLflow's models from code) as the run's MLflow model ``name``
    (``runs:/<run id>/<name>``; listed on the UI's Models page with the run's metrics logged
    so far), and register it as a new version of ``register_as`` when given. Returns MLflow's
    ModelInfo, or None without a logger.

    Fast: the requirements are given (no inference by loading the model) and the input
    example is stored, not run through the model."""
    if logger is None:
        return None
    from mlflow.models import Model

    # Created here, in the run's experiment (Model.log would put it into the experiment that
    # is active in this process), so that runs:/<run id>/<name> finds it.
    model = logger.experiment.create_logged_model(
        experiment_id=logger.experiment_id, name=name, source_run_id=logger.run_id)
    with store_of(logger._tracking_uri), quiet_model_logging():
        return Model.log(None, _PyfuncSaver, name=name, run_id=logger.run_id,
                         model_id=model.model_id,
                         python_model=str(python_model) if isinstance(python_model, Path)
                         else python_model, artifacts=artifacts, signature=signature,
                         input_example=input_example, pip_requirements=pip_requirements,
                         metadata=metadata, registered_model_name=register_as,
                         await_registration_for=30, validate_serving_input=False)
