"""Errors a user can cause. The CLI prints their one-line message and exits with status 2."""


class LmforgeError(Exception):
    """Base class: the message says what is wrong and how to fix it, on one line."""


class ConfigError(LmforgeError):
    """An unknown key, a value of the wrong type, or values that do not fit together."""


class DataError(LmforgeError):
    """A corpus or data file that is missing, empty or unreadable."""


class ModelLoadError(LmforgeError):
    """A model directory or weights file that cannot be used."""


class CheckpointError(LmforgeError):
    """A run directory or checkpoint that cannot be resumed."""
