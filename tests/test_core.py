"""Core plumbing: atomic writes, presets and overrides, the CLI's exit codes."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Tuple

import pytest

from densebench import cli
from densebench.config import apply_overrides, config_dict, config_hash, is_paper_config, make_config, parse_set_options
from densebench.errors import InputError
from densebench.io import atomic_path, write_json_atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.json"
    write_json_atomic(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert dest.read_text().strip().startswith("{") and '"a": 1' in dest.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@dataclass
class Cfg:
    lr: float = 0.03
    steps: Tuple[int, ...] = (30, 60, 90)
    name: str = "x"
    extra: dict = field(default_factory=dict)


def test_overrides_keep_types_and_mark_custom(tmp_path):
    assert parse_set_options(["lr=1", "steps=[1, 2]", "name=abc"]) == {"lr": 1, "steps": [1, 2], "name": "abc"}
    cfg = apply_overrides(Cfg(), {"lr": 1, "steps": [1, 2]}, "test")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.steps == (1, 2)
    assert not is_paper_config(cfg) and is_paper_config(Cfg())
    with pytest.raises(InputError, match="unknown config field 'lrr'"):
        apply_overrides(Cfg(), {"lrr": 1}, "test")
    with pytest.raises(InputError, match="key=value"):
        parse_set_options(["lr"])


def test_make_config_labels(monkeypatch):
    cfg, label = make_config(Cfg, "no_such_section", "paper")
    assert label == "paper" and is_paper_config(cfg)
    cfg, label = make_config(Cfg, "no_such_section", "paper", {"lr": 0.03})
    assert label == "paper"                              # a no-op override stays paper
    cfg, label = make_config(Cfg, "no_such_section", "paper", {"lr": 0.1})
    assert label == "custom"
    assert config_hash(config_dict(Cfg())) != config_hash(config_dict(cfg))
    with pytest.raises(InputError, match="unknown preset"):
        make_config(Cfg, "x", "huge")


def test_cli_usage_error_exits_2_and_module_entry_point_works():
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate"])
    assert exc.value.code == 2
    out = subprocess.run([sys.executable, "-m", "densebench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "evaluate" in out.stdout and "report" in out.stdout
