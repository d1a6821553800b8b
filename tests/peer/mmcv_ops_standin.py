"""Test-only stand-in for mmcv 1.7.2's compiled ops (`mmcv._ext`), built on torchvision.ops.

`install()` registers a module named `mmcv._ext` before mmcv is imported. Functions listed in
IMPLEMENTED provide the ops the reference models call at run time, with mmcv's ext signatures;
any other attribute resolves to a function that raises, so a reference model never runs an op
that nobody checked.
"""
from __future__ import annotations

import sys
import types

IMPLEMENTED: dict = {}


def _missing(name: str):
    def raise_missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} has no stand-in in tests/peer/mmcv_ops_standin.py")

    return raise_missing


def install() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def module_getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return IMPLEMENTED.get(name) or _missing(name)

    ext.__getattr__ = module_getattr
    sys.modules["mmcv._ext"] = ext
