"""Atomic file writes: a checkpoint or a record is either complete on disk or absent.

Everything is written to a temporary file in the destination directory, flushed and
fsync'ed, given the mode a plainly created file would get (0666 minus the umask, where
mkstemp gives 0600), then renamed over the destination (rename is atomic on POSIX within one
filesystem), so a process killed mid-write never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

log = logging.getLogger(__name__)


def _default_file_mode() -> int:
    """0666 minus the umask: the mode open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(dest: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it is renamed to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _default_file_mode())        # mkstemp makes 0600: teammates could not read it
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: "str | os.PathLike", data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: "str | os.PathLike", text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_json_atomic(dest: "str | os.PathLike", obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, dest: "str | os.PathLike") -> None:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def numpy_save_atomic(dest: "str | os.PathLike", array) -> None:
    import numpy as np

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def read_jsonl(path: "str | os.PathLike") -> List[Tuple[str, Dict[str, Any]]]:
    """(line, parsed object) for every non-blank line of an append-only JSON-lines log.

    Appends are not atomic: a process killed while writing leaves a partial last line, which is
    dropped with a warning. A line that is not a JSON object anywhere else is damage we cannot
    explain, so it is an InputError naming the file and line."""
    from densebench.errors import InputError

    numbered = [(no, line) for no, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1)
                if line.strip()]
    entries = []
    for position, (line_no, line) in enumerate(numbered):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if position == len(numbered) - 1:
                log.warning("%s: dropped a partial last line (a run killed while writing it)", path)
                continue
            raise InputError(Path(path), f"line {line_no} is not a log record") from None
        entries.append((line, entry))
    return entries
