"""Checkpoint import: the only way evaluation obtains a backbone.

PROVISIONAL minimal version (torchvision-format state dicts only); the full format
detection lives here once issue 4 lands. The public functions and their signatures below
are the contract the rest of the package relies on.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torchvision

from densebench.errors import InputError


@dataclass
class CheckpointInfo:
    path: str
    sha256: str
    format: str
    arch: str
    backbone_hash: str
    loaded: int = 0
    ignored: List[str] = field(default_factory=list)
    mapping_examples: List[Tuple[str, str]] = field(default_factory=list)

    def record(self) -> dict:
        """The `checkpoint` field of a result record."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format,
                "arch": self.arch, "backbone_hash": self.backbone_hash}

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_hash(state_dict: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_backbone_state_dict(path: "str | Path", arch: Optional[str] = None,
                             allow_unsafe_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], CheckpointInfo]:
    """Backbone tensors in torchvision ResNet naming (no `fc.*`), strictly checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    arch = arch or "resnet50"
    reference = getattr(torchvision.models, arch)().state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in reference if not k.startswith("fc.") and k not in backbone]
    if missing:
        raise InputError(path, f"missing backbone keys: {missing[:10]}")
    info = CheckpointInfo(path=str(path), sha256=file_sha256(path), format="torchvision", arch=arch,
                          backbone_hash=tensors_hash(backbone), loaded=len(backbone))
    return backbone, info


def build_backbone(path: "str | Path", arch: Optional[str] = None,
                   allow_unsafe_pickle: bool = False) -> Tuple[torch.nn.Module, CheckpointInfo]:
    """A torchvision ResNet with the checkpoint's weights loaded strictly; `fc` is Identity."""
    state, info = load_backbone_state_dict(path, arch, allow_unsafe_pickle)
    model = getattr(torchvision.models, info.arch)()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    return model, info
