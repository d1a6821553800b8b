"""The result store: one JSON record per (checkpoint, protocol, config, seed).

Records live in RESULTS_DIR/records/<key>.json and are written atomically. Reports are
regenerated from these files only. Schema: DESIGN.md "Result records".
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

from densebench.errors import InputError
from densebench.io import write_json_atomic

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("protocol", "checkpoint", "metrics", "config", "config_hash", "preset",
                   "comparable", "seed", "world_size", "device", "wall_s", "started", "versions", "data")


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


def load_record(path: "str | Path") -> Dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a readable JSON record ({exc})") from exc
    if not isinstance(record, dict):
        raise InputError(path, "a record must be a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise InputError(path, f"record lacks fields {', '.join(missing)}")
    return record


def load_records(results_dir: "str | Path") -> List[Dict[str, Any]]:
    """All records under RESULTS_DIR/records, sorted by file name (reports are deterministic)."""
    folder = Path(results_dir) / "records"
    if not folder.is_dir():
        raise InputError(folder, "no records folder: run `densebench evaluate` first")
    return [load_record(p) for p in sorted(folder.glob("*.json"))]
