"""The folder for what alfusion derives once per machine and user (converted weights, built
native kernels): ``$ALFUSION_CACHE``, else ``~/.cache/alfusion``."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    env = os.environ.get("ALFUSION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alfusion"
