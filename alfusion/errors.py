"""The refusal type every layer raises (config checks, data sources, checkpoints): a
ConfigError ends a command in one line on stderr with exit status 2 (config_check.exit_refused).
It lives here, importing nothing, so that data sources can raise it without depending on the
config check."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting or input that cannot work; the message names it, what is wrong and the fix."""


class MissingFile(ConfigError, FileNotFoundError):
    """A setting that names a file or folder that does not exist."""
