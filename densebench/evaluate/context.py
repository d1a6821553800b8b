"""What a protocol receives from the runner, and what it gives back.

Every protocol module exposes:
    NAME: str                          the protocol name (DESIGN.md list)
    Config                             a dataclass whose defaults are the paper protocol
    run(ctx: RunContext, cfg: Config) -> ProtocolOutput
The dataset parts each protocol needs are listed once, in densebench.data.check.PROTOCOL_DATASETS.
The runner turns the output into one result record (densebench.results.store).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from densebench.evaluate.checkpoint import CheckpointInfo, build_backbone, load_backbone_state_dict


@dataclass
class RunContext:
    checkpoint: Path
    data_root: Path
    work_dir: Path                      # scratch for this (checkpoint, protocol, config): resume state
    cache_dir: Path                     # feature cache shared by protocols of one results dir
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    arch: Optional[str] = None
    allow_unsafe_pickle: bool = False
    save_features_dir: Optional[Path] = None
    num_workers: int = 0
    show_progress: bool = True

    def backbone(self) -> Tuple[torch.nn.Module, CheckpointInfo]:
        """A fresh torchvision ResNet (fc = Identity) with the checkpoint's weights, on CPU."""
        return build_backbone(self.checkpoint, self.arch, self.allow_unsafe_pickle)

    def backbone_state_dict(self) -> Tuple[Dict[str, torch.Tensor], CheckpointInfo]:
        return load_backbone_state_dict(self.checkpoint, self.arch, self.allow_unsafe_pickle)


@dataclass
class ProtocolOutput:
    metrics: Dict[str, Any]             # protocol-specific, see DESIGN.md "Result records"
    data: Dict[str, Any]                # {"root": ..., "splits": {"trainval": 5011, ...}}
    extra: Dict[str, Any] = field(default_factory=dict)   # per-class values, curves, notes
