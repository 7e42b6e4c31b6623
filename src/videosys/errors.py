"""The error type for bad user input: a config value or path that cannot work.

`videosys.run` prints these as one clear line (no traceback) and exits with status 2; every other
exception is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A bad config value or input; the message names the value and the fix."""


class MissingGeometryError(ConfigError):
    """The model's input geometry (size, channels, classes) is neither configured nor derivable yet."""
