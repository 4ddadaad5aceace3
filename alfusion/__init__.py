"""alfusion: Attentive Multi-Layer Fusion probes for frozen Vision Transformers.

The Python API (docs/python.md) is imported on first use, so that ``import alfusion`` stays
fast: ``alfusion.run``, ``alfusion.compose``, ``alfusion.Probe``, ``alfusion.extract_tokens``,
``alfusion.ALFClassifier``, ``alfusion.LinearProbeClassifier``.
"""

import importlib

from alfusion._torchvision_fix import apply as _apply_torchvision_fix
from alfusion.run_dirs import register_resolvers as _register_resolvers

_apply_torchvision_fix()
_register_resolvers()  # conf/config.yaml's run folders use them

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read (PEP 562)
_API = {"run": "alfusion.app", "compose": "alfusion.app", "Probe": "alfusion.api.probe",
        "extract_tokens": "alfusion.api.tokens", "ALFClassifier": "alfusion.api.estimators",
        "LinearProbeClassifier": "alfusion.api.estimators"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module 'alfusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
