"""Runs read back from an MLflow store (SQLite file or server), reduced to what a report needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

METRIC = "test/bal_acc"


@dataclass
class RunRecord:
    """One MLflow run: which experiment cell it fills and with what result.

    status: MLflow's (FINISHED, FAILED, RUNNING, KILLED); bal_acc: test balanced accuracy in
    [0, 1], None when the run logged none (failed or unfinished)."""

    run_id: str
    dataset: str
    backbone: str
    probe: str
    kind: str
    status: str
    bal_acc: float | None
    start_time: int

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and self.bal_acc is not None


def client_for(tracking_uri: str) -> MlflowClient:
    """A client for ``tracking_uri``; a SQLite file that does not exist is an error (MLflow
    would silently create an empty store)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise FileNotFoundError(f"no MLflow store at {path}: run an experiment first, or "
                                    "point --tracking-uri at the store (sqlite:///PATH or a "
                                    "server's http://HOST:PORT)")
    return MlflowClient(tracking_uri)


def filter_string(tags: dict[str, str]) -> str:
    """MLflow search syntax selecting runs that carry every tag k=v."""
    parts = []
    for key, value in tags.items():
        quoted = value.replace("'", "\\'")
        parts.append(f"tags.`{key}` = '{quoted}'")
    return " and ".join(parts)


def record_of(run) -> RunRecord:
    """Cell coordinates from the logged config params, else from the run name
    ('dataset/backbone/probe', conf/logger/mlflow.yaml)."""
    params = run.data.params
    from_name = (run.info.run_name or "").split("/")
    from_name += [""] * (3 - len(from_name))
    return RunRecord(
        run_id=run.info.run_id,
        dataset=params.get("dataset/name") or from_name[0] or "?",
        backbone=params.get("backbone/key") or from_name[1] or "?",
        probe=params.get("probe/name") or from_name[2] or "?",
        kind=params.get("probe/kind", ""),
        status=run.info.status,
        bal_acc=run.data.metrics.get(METRIC),
        start_time=run.info.start_time or 0,
    )


def fetch_runs(client: MlflowClient, experiment: str, tags: dict[str, str] | None = None
               ) -> list[RunRecord]:
    """Every active run of ``experiment`` carrying all ``tags``, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no MLflow experiment named {experiment!r} in this store; "
                          f"experiments there: {names}. Pass --experiment NAME")
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string(tags or {}),
                                  ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        out += [record_of(r) for r in page]
        token = page.token
        if not token:
            return out
