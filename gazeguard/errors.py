"""Errors that stop a run before training, with a message a user can act on.

The CLIs catch :class:`GazeguardError` and print its message on one line, so every raise site
names the file or option and what is wrong with it.
"""


class GazeguardError(Exception):
    """Base class for user-facing errors (bad input, bad configuration)."""


class DataFormatError(GazeguardError, ValueError):
    """A data file is missing, unreadable or not laid out as its format requires."""


class ConfigError(GazeguardError, ValueError):
    """An option has a value that cannot work (unknown name, out of range, empty split)."""
