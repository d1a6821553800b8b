"""Core plumbing: atomic writes, presets and overrides, the CLI's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

import pytest

from densebench import cli
from densebench.config import (Milestones, PositiveInt, apply_overrides, config_dict, config_hash, is_paper_config,
                               make_config, parse_set_options)
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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_of_a_plain_new_file(tmp_path, umask, mode):
    """Issue 18: records and converted checkpoints came out 0600 (mkstemp's mode), unreadable to
    the rest of a team sharing a results dir."""
    import os

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "record.json", {"a": 1})
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == mode == (tmp_path / "plain.json").stat().st_mode & 0o777


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


@dataclass
class Typed:
    flag: bool = True
    count: PositiveInt = 4
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    pair: Tuple[float, float] = (0.1, 0.2)
    sizes: Tuple[PositiveInt, ...] = (1, 2)
    steps: Milestones = (3,)
    grid: Optional[PositiveInt] = None


@pytest.mark.parametrize("field_name,value,result", [
    ("flag", False, False), ("flag", 0, False), ("flag", 1, True), ("flag", "no", False),
    ("count", 7, 7), ("rate", 2, 2.0), ("rate", "1e-3", 0.001), ("mode", "b", "b"),
    ("pair", [1, 2.5], (1.0, 2.5)), ("sizes", [5], (5,)), ("steps", [], ()), ("grid", "null", None),
    ("grid", None, None), ("grid", 7, 7),
])
def test_set_values_become_the_annotated_type(field_name, value, result):
    text = value if isinstance(value, str) else json.dumps(value)
    cfg = apply_overrides(Typed(), parse_set_options([f"{field_name}={text}"]), "--set t")
    got = getattr(cfg, field_name)
    assert got == result and type(got) is type(result)


@pytest.mark.parametrize("field_name,text,expected_words", [
    ("flag", "flase", "true or false"), ("flag", "2", "true or false"), ("count", "0", "an integer > 0"),
    ("count", "1.5", "an integer > 0"), ("count", "true", "an integer"), ("rate", "abc", "a number"),
    ("rate", ".nan", "a number"), ("rate", "true", "a number"), ("mode", "c", "one of a, b"),
    ("pair", "[1]", "a list of 2 items, each a number"), ("pair", "1", "a list of 2 items"),
    ("sizes", "[]", "one or more items, each an integer > 0"), ("sizes", "[1, -1]", "an integer > 0"),
    ("steps", "[0]", "zero or more items, each an integer > 0"), ("grid", "0", "null or an integer > 0"),
])
def test_bad_set_values_name_field_value_and_type(field_name, text, expected_words):
    with pytest.raises(InputError) as info:
        apply_overrides(Typed(), parse_set_options([f"{field_name}={text}"]), "--set t")
    message = str(info.value)
    assert message.startswith(f"--set t.{field_name}: expected ") and expected_words in message
    assert message.endswith(f"got {parse_set_options([f'x={text}'])['x']!r}")


def test_every_config_field_has_a_checkable_annotation_that_its_defaults_and_presets_meet():
    """A new config field with an annotation the checker does not know fails here, not on a user."""
    import dataclasses
    import importlib
    from typing import get_type_hints

    from densebench.config import coerce, expected
    from densebench.evaluate.runner import PROTOCOL_ORDER
    from densebench.pretrain.trainer import PretrainConfig

    classes = [(name, importlib.import_module(f"densebench.protocols.{name}").Config) for name in PROTOCOL_ORDER]
    for section, cls in classes + [("pretrain", PretrainConfig)]:
        hints = get_type_hints(cls, include_extras=True)
        for field_info in dataclasses.fields(cls):
            expected(hints[field_info.name])
            default = getattr(cls(), field_info.name)
            assert coerce(default, hints[field_info.name]) == default, (section, field_info.name)
        for preset in ("paper", "tiny"):
            make_config(cls, section, preset)


def test_pretrain_arch_choices_are_the_models():
    from densebench.pretrain.model import ARCHS
    from densebench.pretrain.trainer import PretrainConfig
    from typing import get_args, get_type_hints

    assert get_args(get_type_hints(PretrainConfig, include_extras=True)["arch"]) == ARCHS
