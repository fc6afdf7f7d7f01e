"""Errors a user can act on.

Everything raised as a `HeadraceError` is printed by the CLI as one line (`headrace: error: ...`) with a
non-zero exit, never as a traceback: the message must name what to fix (the flag, the file and line, the
field). Anything else escaping to the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = ["ConfigError", "HeadraceError", "InputError", "MissingDependencyError", "user_error_in"]


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


_RAISED = re.compile(r"headrace\.core\.errors\.(InputError|ConfigError|HeadraceError): ([^\n]+)")


def user_error_in(text: str) -> HeadraceError | None:
    """The headrace error named in a remote traceback's text (a Flink or Dataflow job reports a worker's
    exception as text inside its own), or None when the text holds none."""
    match = _RAISED.search(text)
    if match is None:
        return None
    return {"InputError": InputError, "ConfigError": ConfigError}.get(match[1], HeadraceError)(
        match[2].strip()
    )
