"""Presets and overrides for the plain-dataclass configs of pre-training and protocols.

A protocol's `Config` defaults are the paper protocol. A preset (presets/<name>.yaml) maps a
protocol name to the fields it changes; `--set key=value` changes single fields after that.
A run is comparable to the published numbers only when the final config equals the defaults.

Every value from a preset or `--set` is checked against its field's annotation before it is
used, so a typo fails in one line before any data is read instead of running with a string
where a bool belongs (`amp=flase`) or dying after feature extraction. The annotations say all
there is to check: bool, int, float, str, `Literal[...]` for a field with a fixed set of choices,
`Tuple[X, ...]` (one or more items) or `Tuple[X, Y]` (exactly two), `Optional[X]`, and
`Annotated[X, rule]` for a range (`PositiveInt`, `Fraction` below).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import (Annotated, Any, Callable, Dict, Iterable, Literal, Optional, Tuple, Type, TypeVar, Union,
                    get_args, get_origin, get_type_hints)

import yaml

from densebench.errors import InputError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("paper", "tiny")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A condition on a field's value beyond its type, attached as `Annotated[int, POSITIVE]`."""
    text: str                          # completes "expected an integer ..." in error messages
    holds: Callable[[Any], bool]


POSITIVE = Rule("> 0", lambda v: v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)
UNIT_INTERVAL = Rule("in [0, 1]", lambda v: 0 <= v <= 1)
SEED_RANGE = Rule("in [0, 2**32 - 1]", lambda v: 0 <= v < 2 ** 32)       # what numpy's seeding accepts
MAY_BE_EMPTY = Rule("", lambda v: True)     # on a Tuple[X, ...] field: () is allowed (e.g. no lr steps)

PositiveInt = Annotated[int, POSITIVE]                  # sizes, batch sizes, counts, chunk lengths
NonNegativeInt = Annotated[int, NON_NEGATIVE]           # intervals and limits where 0 means off / all
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
Fraction = Annotated[float, UNIT_INTERVAL]              # probabilities, IoU thresholds, momenta
Seed = Annotated[int, SEED_RANGE]
Milestones = Annotated[Tuple[PositiveInt, ...], MAY_BE_EMPTY]   # lr decay steps; () = constant lr
AllowedBorder = Annotated[int, Rule(">= -1", lambda v: v >= -1)]  # mmdet allowed_border: -1 = every anchor


class _Mismatch(Exception):
    """A value does not fit an annotation (turned into one message naming the whole field)."""


def _split(hint: Any) -> Tuple[Any, Tuple[Rule, ...]]:
    if get_origin(hint) is Annotated:
        bare, *rules = get_args(hint)
        return bare, tuple(r for r in rules if isinstance(r, Rule))
    return hint, ()


def _optional_inner(hint: Any) -> Any:
    inner = [a for a in get_args(hint) if a is not type(None)]
    if len(inner) != 1:
        raise TypeError(f"unsupported config annotation {hint}")
    return inner[0]


def expected(hint: Any) -> str:
    """What a field accepts, in words: `Tuple[PositiveInt, ...]` -> "a list of one or more items, each an integer > 0"."""
    bare, rules = _split(hint)
    origin, args = get_origin(bare), get_args(bare)
    if origin is Union:
        text = "null or " + expected(_optional_inner(bare))
    elif origin is Literal:
        text = "one of " + ", ".join(str(a) for a in args)
    elif origin is tuple and args[-1] is Ellipsis:
        text = (f"a list of {'zero' if MAY_BE_EMPTY in rules else 'one'} or more items, "
                f"each {expected(args[0])}")
    elif origin is tuple:
        items = [expected(a) for a in args]
        text = (f"a list of {len(args)} items, each {items[0]}" if len(set(items)) == 1
                else f"a list of {len(args)} items: " + "; ".join(items))
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[bare]
    return " ".join([text] + [r.text for r in rules if r.text and origin is not tuple])


def coerce(value: Any, hint: Any) -> Any:
    """`value` as YAML parsed it, converted to the annotation `hint`; _Mismatch when it does not fit.

    Only lossless conversions: 0/1 to a bool, an integer to a float, a list to a tuple, and a
    string such as "1e-3" to a float (YAML 1.1 reads exponents without a dot as strings).
    """
    bare, rules = _split(hint)
    origin, args = get_origin(bare), get_args(bare)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        value = coerce(value, _optional_inner(bare))
    elif origin is Literal:
        if not (isinstance(value, str) and value in args):
            raise _Mismatch
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if args[-1] is Ellipsis:
            if not value and MAY_BE_EMPTY not in rules:
                raise _Mismatch
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise _Mismatch
        value = tuple(coerce(item, item_hint) for item, item_hint in zip(value, args))
    elif bare is bool:
        if not (isinstance(value, bool) or (type(value) is int and value in (0, 1))):
            raise _Mismatch
        value = bool(value)
    elif bare is int:
        if type(value) is not int:
            raise _Mismatch
    elif bare is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Mismatch
        value = float(value)
    elif bare is str:
        if not isinstance(value, str):
            raise _Mismatch
    else:
        raise TypeError(f"unsupported config annotation {hint}")
    if not all(rule.holds(value) for rule in rules):
        raise _Mismatch
    return value


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
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise InputError(None, f"--set {item}: the value is not valid YAML ({problem})") from None
    return out


def apply_overrides(cfg: T, overrides: Dict[str, Any], where: str, path: "Path | None" = None) -> T:
    """Set fields of `cfg`, each value checked against and converted to its annotation.

    `where` names the source in messages ("--set knn_imagenet"), `path` the file it came from.
    """
    names = sorted(f.name for f in dataclasses.fields(cfg))
    hints = get_type_hints(type(cfg), include_extras=True)
    for key, value in overrides.items():
        if key not in names:
            raise InputError(path, f"{where}: unknown config field {key!r}; known: {', '.join(names)}")
        try:
            setattr(cfg, key, coerce(value, hints[key]))
        except _Mismatch:
            raise InputError(path, f"{where}.{key}: expected {expected(hints[key])}, got {value!r}") from None
    return cfg


def make_config(config_cls: Type[T], section: str, preset: str = "paper",
                overrides: Optional[Dict[str, Any]] = None) -> Tuple[T, str]:
    """Build the config for `section` under `preset`; returns (config, preset_label).

    preset_label is "paper" or "tiny" when nothing else was changed, "custom" otherwise.
    """
    cfg = config_cls()
    apply_overrides(cfg, load_preset(preset).get(section) or {}, section, PRESET_DIR / f"{preset}.yaml")
    label = preset
    if overrides:
        before = config_dict(cfg)
        apply_overrides(cfg, overrides, f"--set {section}")
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
