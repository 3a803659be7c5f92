"""The error type the CLI reports as one line.

Every problem caused by the input or the environment (a bad file, a missing checkpoint, a store made
with another model, an unreadable config) raises a subclass of :class:`BoxrefineError` whose message
names the file or key and the problem on one line. The CLI prints it and exits non-zero
(``exit_code``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BoxrefineError(Exception):
    exit_code = 1


class DeviceError(BoxrefineError, ValueError):
    """A device that this machine does not have."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit``
    characters: how a library's multi-line error is quoted in a one-line message."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
