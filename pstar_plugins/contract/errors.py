"""The library's exception types.

Every error a user can cause names the bad value, what was expected and how to fix it. They all
derive from :class:`PStarError`, so callers (and the fuzz tests) can tell the library's own
refusals from bugs.
"""

from __future__ import annotations


class PStarError(Exception):
    """Base class of every error raised on purpose by pstar-plugins."""


class ConfigError(PStarError, ValueError):
    """A method, template or training option has an invalid value."""


class UnknownMethodError(ConfigError, KeyError):
    """A method name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(PStarError, RuntimeError):
    """A plugin is malformed, collides with another one, or raised inside a hook."""


class IncompatibleModelError(PStarError, ValueError):
    """The model cannot host the method (no attention layers, geometry mismatch, ...)."""


class AdapterError(PStarError, ValueError):
    """A saved adapter is missing, corrupt, from a newer format, or made for another model."""


class DataError(PStarError, ValueError):
    """A data file or an example in it is unusable."""


class UnsupportedError(PStarError, NotImplementedError):
    """The method does not do what was asked of it (``generate()`` of a method without it)."""


def run_reporting_errors(function, *args) -> int:
    """Run a command's body; a library error is printed as ``error: ...`` and exits 2 (no traceback)."""
    import sys

    try:
        return function(*args)
    except PStarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
