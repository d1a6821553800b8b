"""The result store: one JSON record per (checkpoint, protocol, config, seed).

Records live in RESULTS_DIR/records/<key>.json and are written atomically (a temp file renamed
into place), so several `evaluate` processes can share one results dir. Reports are regenerated
from these files only. Schema: DESIGN.md "Result records".

A record that cannot be read (not UTF-8, not JSON, a field missing or of the wrong type) stops
`report` and `evaluate` with one line naming it and any others like it, rather than being
skipped with a warning: densebench never leaves a half-written record, so an unreadable one was
damaged by something else (a copy, a disk, a hand edit), and a report that silently lacks a
cell looks complete. Deleting the file and re-running `evaluate` for that cell mends it.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

from densebench.errors import InputError
from densebench.io import write_json_atomic

SCHEMA_VERSION = 1
# every field a record must have -> the JSON type(s) its value must be (reports use them unchecked)
FIELD_TYPES = {"protocol": str, "checkpoint": dict, "metrics": dict, "config": dict, "config_hash": str,
               "preset": str, "comparable": bool, "seed": int, "world_size": int, "device": str,
               "wall_s": (int, float), "started": str, "versions": dict, "data": dict}
REQUIRED_FIELDS = tuple(FIELD_TYPES)
TYPE_NAMES = {str: "a string", dict: "an object", bool: "true/false", int: "an integer", (int, float): "a number"}


def record_key(protocol: str, checkpoint_sha256: str, config_hash: str, seed: int) -> str:
    return f"{protocol}__{checkpoint_sha256[:12]}__{config_hash}__seed{seed}"


def record_path(results_dir: "str | Path", key: str) -> Path:
    return Path(results_dir) / "records" / f"{key}.json"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> Dict[str, Optional[str]]:
    import torch
    import torchvision

    import densebench

    return {"densebench": densebench.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "git_commit": git_commit()}


def write_record(results_dir: "str | Path", record: Dict[str, Any]) -> Path:
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"record lacks fields {missing}")
    key = record_key(record["protocol"], record["checkpoint"]["sha256"], record["config_hash"], record["seed"])
    record = dict(record, key=key, schema=SCHEMA_VERSION)
    path = record_path(results_dir, key)
    write_json_atomic(path, record)
    return path


def record_problem(record: Any) -> Optional[str]:
    """What is wrong with a parsed record, or None."""
    if not isinstance(record, dict):
        return "a record must be a JSON object"
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        return f"record lacks fields {', '.join(missing)}"
    for name, types in FIELD_TYPES.items():
        value = record[name]
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            return f"field {name} must be {TYPE_NAMES[types]}, not {json.dumps(value)[:40]}"
    for name in ("path", "sha256"):
        if not isinstance(record["checkpoint"].get(name), str):
            return f"field checkpoint.{name} must be a string"
    if not isinstance(record.get("extra", {}), dict):
        return "field extra must be an object"
    return None


def load_record(path: "str | Path") -> Dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read the record ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a JSON record: invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not a JSON record (truncated or damaged? {exc})") from None
    problem = record_problem(record)
    if problem:
        raise InputError(path, problem)
    return record


def load_records(results_dir: "str | Path") -> List[Dict[str, Any]]:
    """All records under RESULTS_DIR/records, sorted by file name (reports are deterministic).

    One unreadable record stops it (see the module docstring); the message names the first and
    counts the others, so one run lists everything to mend.
    """
    folder = Path(results_dir) / "records"
    if not folder.is_dir():
        raise InputError(folder, "no records folder: run `densebench evaluate` first")
    records, errors = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(load_record(path))
        except InputError as exc:
            errors.append(exc)
    if errors:
        others = f" (and {len(errors) - 1} more unreadable: {', '.join(Path(e.path).name for e in errors[1:])})"
        raise InputError(errors[0].path, f"{errors[0].problem}; delete it and re-run `densebench evaluate` "
                                         f"for that cell{others if len(errors) > 1 else ''}")
    return records
