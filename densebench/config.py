"""Presets and overrides for the plain-dataclass configs of pre-training and protocols.

A protocol's `Config` defaults are the paper protocol. A preset (presets/<name>.yaml) maps a
protocol name to the fields it changes; `--set key=value` changes single fields after that.
A run is comparable to the published numbers only when the final config equals the defaults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Type, TypeVar

import yaml

from densebench.errors import InputError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("paper", "tiny")

T = TypeVar("T")


def load_preset(name: str) -> Dict[str, Dict[str, Any]]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(path, f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise InputError(path, "a preset must map section names to field overrides")
    return data


def parse_set_options(items: Optional[Iterable[str]]) -> Dict[str, Any]:
    """`["lr=0.1", "steps=[30,60]"]` -> {"lr": 0.1, "steps": [30, 60]} (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise InputError(None, f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(cfg: T, overrides: Dict[str, Any], where: str) -> T:
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key not in names:
            raise InputError(None, f"{where}: unknown config field {key!r}; known: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        setattr(cfg, key, value)
    return cfg


def make_config(config_cls: Type[T], section: str, preset: str = "paper",
                overrides: Optional[Dict[str, Any]] = None) -> Tuple[T, str]:
    """Build the config for `section` under `preset`; returns (config, preset_label).

    preset_label is "paper" or "tiny" when nothing else was changed, "custom" otherwise.
    """
    cfg = config_cls()
    apply_overrides(cfg, load_preset(preset).get(section) or {}, f"preset {preset}/{section}")
    label = preset
    if overrides:
        before = config_dict(cfg)
        apply_overrides(cfg, overrides, "--set")
        if config_dict(cfg) != before:
            label = "custom"
    return cfg, label


def config_dict(cfg: Any) -> Dict[str, Any]:
    """JSON-ready dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(config: Dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def is_paper_config(cfg: Any) -> bool:
    """True when every field equals the paper default of its dataclass."""
    return config_dict(cfg) == config_dict(type(cfg)())
