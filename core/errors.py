"""Errors a user can act on.

Everything raised as a `HeadraceError` is printed by the CLI as one line (`headrace: error: ...`) with a
non-zero exit, never as a traceback: the message must name what to fix (the flag, the file and line, the
field). Anything else escaping to the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "HeadraceError", "InputError", "MissingDependencyError"]


class HeadraceError(Exception):
    """Base class of errors caused by what the user gave us (flags, files, environment)."""

    exit_code = 1


class ConfigError(HeadraceError):
    """A flag, config name or override is wrong; like argparse errors, exits with 2."""

    exit_code = 2


class InputError(HeadraceError):
    """An input file or record is unusable; the message names the file and the line or field."""


class MissingDependencyError(HeadraceError):
    """Something the project installs itself (a jar, a broker) is not installed on this machine."""
