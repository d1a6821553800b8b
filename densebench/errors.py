"""The one error type that reaches users: bad input, reported as one line that names the file.

The CLI catches `InputError`, prints its message and exits 1; everything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import os

# How traceback.format_exception names this class on the exception's own line.
_QUALIFIED_NAME = f"{__name__}.InputError: "


class InputError(Exception):
    """Bad user input: a file or directory that is missing, malformed or inconsistent.

    `InputError(path, problem)` is the form to raise. The one-argument form `InputError(message)`
    exists for the DataLoader: a worker cannot send the exception itself, only its class and
    formatted traceback, and the main process rebuilds it as `cls(text)` (torch
    `ExceptionWrapper.reraise`). Without this form that fails and turns into a RuntimeError
    with a traceback; with it, the text is cut back to the original one-line message. The same
    form lets pickle (multiprocessing) rebuild it: from `args`, then `path`/`problem` from `__dict__`.
    """

    def __init__(self, path: "str | os.PathLike | None", problem: "str | None" = None):
        if problem is None:  # rebuilt from a worker's traceback text (or a bare message)
            path, problem = None, _original_message(str(path))
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def _original_message(text: str) -> str:
    """The message of the last `InputError: ...` line of a formatted traceback, else `text`."""
    start = text.rfind("\n" + _QUALIFIED_NAME)
    if start < 0:
        return text
    return text[start + 1 + len(_QUALIFIED_NAME):].strip()
