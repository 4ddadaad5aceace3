"""alfusion: Attentive Multi-Layer Fusion probes for frozen Vision Transformers."""

from alfusion._torchvision_fix import apply as _apply_torchvision_fix
from alfusion.run_dirs import register_resolvers as _register_resolvers

_apply_torchvision_fix()
_register_resolvers()  # conf/config.yaml's run folders use them

__version__ = "0.1.0"
