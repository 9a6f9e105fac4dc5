"""Project error classes.

``qarvd`` (``qarvd_jax.cli.main``) prints a :class:`UserError` as one line naming the file, flag or
field, and exits with code 2 (``qarvd --debug`` shows the traceback). Raise it, or a subclass, for
anything the user can fix: a bad file, flag, config value or destination. Every class also derives
from ``ValueError`` so older callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "OutputError", "NonFiniteError"]


class UserError(ValueError):
    """A problem with the user's input (file, flag, config field, destination); not a bug."""


class ConfigError(UserError, TypeError):
    """A config value of the wrong type or an unreadable config file (names the file and field)."""


class OutputError(UserError):
    """A destination that would delete or overwrite something the user did not ask to replace."""


class NonFiniteError(UserError):
    """Tensors hold NaN/inf values (refused unless ``--allow-nonfinite``)."""
