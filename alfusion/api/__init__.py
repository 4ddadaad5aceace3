"""alfusion's Python API (docs/python.md): ``run``, ``compose``, ``Probe``, ``extract_tokens``,
``ALFClassifier``, ``LinearProbeClassifier``; each also exported from ``alfusion``."""

from alfusion.api.estimators import ALFClassifier, LinearProbeClassifier, TokenProbeClassifier
from alfusion.api.probe import Probe
from alfusion.api.tokens import extract_tokens
from alfusion.app import compose, run

__all__ = ["ALFClassifier", "LinearProbeClassifier", "Probe", "TokenProbeClassifier", "compose",
           "extract_tokens", "run"]
