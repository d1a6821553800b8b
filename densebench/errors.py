"""The one error type that reaches users: bad input, reported as one line that names the file.

The CLI catches `InputError`, prints its message and exits 1; everything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input: a file or directory that is missing, malformed or inconsistent."""

    def __init__(self, path: "str | os.PathLike | None", problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
