"""alfusion: Attentive Multi-Layer Fusion probes for frozen Vision Transformers."""

from alfusion._torchvision_fix import apply as _apply_torchvision_fix

_apply_torchvision_fix()

__version__ = "0.1.0"
