"""Loading weights from a model hub, failing in seconds (not minutes) where it is unreachable."""

from __future__ import annotations

import os
import socket


class BackboneUnavailable(RuntimeError):
    """Pretrained weights could not be loaded; the message says which config key to set."""


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def force_offline() -> None:
    """Let huggingface_hub serve only its local cache instead of hanging on retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def load_from_hub(load, what: str, key: str):
    """Call ``load()``; where the hub is unreachable, use only the local cache.

    Raises BackboneUnavailable naming ``what`` (e.g. the timm model name) and the config key
    (``key``) that points at a local weights file.
    """
    if not hub_reachable():
        force_offline()
    try:
        return load()
    except Exception as err:  # the hub libraries raise many kinds; all mean "no weights"
        raise BackboneUnavailable(
            f"could not load pretrained weights for {what}: the model hub is unreachable or "
            f"the weights are not in the local cache ({type(err).__name__}: {err}). "
            f"Download them on a networked machine and set {key}=/path/to/weights "
            f"(a .safetensors/.bin/.pth file), or use the offline default backbone "
            f"(backbone=offline_vit_s14)."
        ) from err
