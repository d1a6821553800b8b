"""`densebench convert`: export an imported backbone for torchvision, detectron2 or mmdet/mmseg.

The backbone always comes through `checkpoint.load_backbone_state_dict` (strict, safe import),
so any format `inspect` understands can be converted. Outputs:

- torchvision: a bare state dict in torchvision ResNet names without `fc.*`;
  `torchvision.models.<arch>().load_state_dict(sd, strict=False)` reports only `fc.weight`
  and `fc.bias` missing.
- detectron2: the PROTOCOLS.md 1.7 convention ([DC] convert-pretrain-to-detectron2.py): keys
  outside `layerN` get a `stem.` prefix, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`,
  `downsample.0` -> `shortcut`, `downsample.1` -> `shortcut.norm`; values are numpy arrays;
  pickled as {"model", "__author__", "matching_heuristics": True}. detectron2 only unpickles
  files whose name ends in `.pkl`, so the output must be named so.
- mmdet: {"state_dict": {"backbone.<torchvision name>": tensor}, "meta": {...}}, the layout of
  an MMDetection/MMSegmentation model's backbone; use it with `load_from=` or with
  `init_cfg=dict(type="Pretrained", prefix="backbone.", checkpoint=FILE)`.

Writing a pickle of our own numpy arrays is safe; reading one back needs
`--allow-unsafe-pickle` like any other pickle.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping

import torch

from densebench.errors import InputError
from densebench.evaluate.checkpoint import CheckpointInfo, load_backbone_state_dict
from densebench.io import atomic_path, torch_save_atomic

TARGETS = ("torchvision", "detectron2", "mmdet")
AUTHOR = "densebench"


def to_torchvision(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Bare torchvision state dict without the classifier."""
    return {k: v.detach().cpu().clone() for k, v in state_dict.items() if not k.startswith("fc.")}


def detectron2_key(key: str) -> str:
    """torchvision name -> detectron2 name, as PROTOCOLS.md 1.7 specifies."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key


def to_detectron2(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The detectron2 pickle payload: numpy arrays under detectron2 names."""
    model = {detectron2_key(k): v.detach().cpu().numpy().copy()
             for k, v in state_dict.items() if not k.startswith("fc.")}
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True}


def to_mmdet(state_dict: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> dict:
    """An OpenMMLab checkpoint holding only the backbone (`backbone.*`) plus `meta`."""
    backbone = {f"backbone.{k}": v.detach().cpu().clone() for k, v in state_dict.items() if not k.startswith("fc.")}
    return {"state_dict": backbone, "meta": dict(meta or {})}


def _meta(info: CheckpointInfo) -> dict:
    return {"author": AUTHOR, "source": info.path, "source_sha256": info.sha256,
            "source_format": info.format, "arch": info.arch, "backbone_hash": info.backbone_hash}


def write_converted(state_dict: Mapping[str, torch.Tensor], info: CheckpointInfo, target: str,
                    out: "str | Path") -> Path:
    """Write one export atomically (a failed write leaves no file behind)."""
    out = Path(out)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {TARGETS}")
    if target == "detectron2":
        if out.suffix != ".pkl":
            raise InputError(out, "detectron2 only reads pickled weights from files named *.pkl")
        payload = to_detectron2(state_dict)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as fh:
                pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
    elif target == "mmdet":
        torch_save_atomic(to_mmdet(state_dict, _meta(info)), out)
    else:
        torch_save_atomic(to_torchvision(state_dict), out)
    return out


def refuse_overwriting_input(ckpt: "str | Path", out: "str | Path") -> None:
    """The export must never replace its source (the same file by any path: symlink, relative
    path, hard link): a backbone-only file would silently take the place of the full checkpoint."""
    ckpt, out = Path(ckpt), Path(out)
    same = ckpt.resolve() == out.resolve()
    if not same and out.exists() and ckpt.exists():
        same = os.path.samefile(ckpt, out)
    if same:
        raise InputError(out, f"is the input checkpoint ({ckpt}); convert never writes over its input, "
                         "choose another --out")


def main(args) -> int:
    """`densebench convert CKPT --to torchvision|detectron2|mmdet --out FILE [--arch] [--allow-unsafe-pickle]`."""
    refuse_overwriting_input(args.ckpt, args.out)
    state, info = load_backbone_state_dict(args.ckpt, args.arch, args.allow_unsafe_pickle)
    out = write_converted(state, info, args.to, args.out)
    print(f"{info.path} ({info.format}, {info.arch}, backbone_hash {info.backbone_hash}) -> "
          f"{out} ({args.to}, {len(state)} tensors)")
    return 0
