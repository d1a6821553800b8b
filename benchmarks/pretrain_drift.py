"""How far a pre-training run moved the backbone from its initial weights, per stage.

    python benchmarks/pretrain_drift.py WORK_DIR [WORK_DIR ...]

For each work dir of `densebench pretrain` (started from scratch, not --init-from) this rebuilds
the run's initial model from its saved config (trainer.initial_backbone_state: seed, then build),
and prints, for the stem and each residual stage, over the stage's conv weights:
- the relative distance ||w_end - w_init|| / ||w_init||,
- the norm ratio ||w_end|| / ||w_init||.
The convs are followed by BN, so the norm ratio says how much the effective learning rate of
fine-tuning shrinks (it scales with 1 / norm^2), and the distance how much the stage learnt.
The README's finding that 200 tiny steps leave layer3-4 within ~10-20% of their random init
(the checkpoint is its random init plus a learned stem) comes from this script.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from densebench.config import apply_overrides
from densebench.errors import InputError
from densebench.pretrain.trainer import (RETIRED_FIELDS, PretrainConfig, extract_backbone, initial_backbone_state,
                                         load_checkpoint, read_latest)

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


def saved_config(work_dir: Path) -> PretrainConfig:
    """The run's PretrainConfig from config.json, checked and converted as preset values are
    (options it predates keep their defaults, retired ones are dropped)."""
    path = work_dir / "config.json"
    if not path.is_file():
        raise InputError(path, "not found: not a `densebench pretrain` work dir")
    try:
        saved = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a `densebench pretrain` config ({exc.__class__.__name__}: {exc})") from exc
    return apply_overrides(PretrainConfig(), {k: v for k, v in saved.items() if k not in RETIRED_FIELDS},
                           "config.json", path)


def final_backbone(work_dir: Path) -> Dict[str, torch.Tensor]:
    """The query backbone of the run's newest checkpoint; refuses runs started from another one."""
    ckpt = load_checkpoint(read_latest(work_dir))
    if "init_from" in ckpt:
        raise InputError(work_dir, f"started from {ckpt['init_from']}, not from a seeded init")
    return extract_backbone(ckpt["state_dict"])


def stage_drift(end: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]) -> List[Tuple[str, float, float]]:
    """(stage, ||end - init|| / ||init||, ||end|| / ||init||) over each stage's 4-d (conv) weights."""
    rows = []
    for stage in STAGES:
        keys = [k for k, v in init.items() if v.dim() == 4 and (k == f"{stage}.weight" or k.startswith(f"{stage}."))]
        a = torch.cat([end[k].double().flatten() for k in keys])
        b = torch.cat([init[k].double().flatten() for k in keys])
        rows.append((stage, float((a - b).norm() / b.norm()), float(a.norm() / b.norm())))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:  # every work dir is read before anything is printed
        runs = [(work_dir, saved_config(work_dir), final_backbone(work_dir)) for work_dir in args.work_dirs]
    except InputError as exc:
        print(f"pretrain_drift: error: {exc}", file=sys.stderr)
        return 1
    print(f"{'run':32s} " + " ".join(f"{s:>15s}" for s in STAGES))
    for work_dir, cfg, end in runs:
        rows = stage_drift(end, initial_backbone_state(cfg))
        print(f"{work_dir.name[:32]:32s} " + " ".join(f"{d:6.3f} (x{r:5.2f})" for _, d, r in rows))
    print("each cell: ||w_end - w_init|| / ||w_init|| (||w_end|| / ||w_init||) over the stage's conv weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
