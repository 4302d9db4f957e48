"""User-facing errors.

Anything wrong with what the user gave us (a config value, a path, a checkpoint, a mask) raises
`UmmaeError`. The command line prints its message as one line and exits with status 2, so a
mistake never ends in a traceback.
"""


class UmmaeError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(UmmaeError):
    """An invalid configuration value; the message names the option."""
