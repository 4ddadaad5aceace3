"""alfusion's Python API (docs/python.md), exported from ``alfusion`` on first use:
``run``/``compose`` (alfusion/app.py), ``Probe`` (probe.py), ``extract_tokens`` (tokens.py),
``ALFClassifier``/``LinearProbeClassifier`` (estimators.py); the probe as an MLflow model
(mlflow_model.py). Nothing is imported here, so that each name loads only what it needs."""
