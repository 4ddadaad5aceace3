"""The code MLflow runs to load an alfusion probe model (MLflow's "models from code": the
model is this file plus probe.pt, never a pickle). It needs alfusion installed."""

import mlflow.models

from alfusion.api.mlflow_model import ProbeModel

mlflow.models.set_model(ProbeModel())
