"""Write a seeded random-init ResNet as a checkpoint: the baseline row of every table.

Usage: python -m densebench.evaluate.random_init --arch resnet18 --seed 0 --out FILE.pth
       python -m densebench.evaluate.random_init --arch resnet18 --pretrain-preset tiny --seed 0 --out FILE.pth

With --pretrain-preset the checkpoint holds the exact weights `densebench pretrain --preset P
--arch A --set seed=S` starts from, so the baseline differs from the pre-trained checkpoint by the
pre-training alone and not also by the random draw. That draw alone moved VOC detection AP50 by
5 points at tiny scale (docs/TINY_DEFAULT.md). Without it: torchvision's own init under
torch.manual_seed(S).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch
import torchvision

from densebench.errors import InputError
from densebench.io import torch_save_atomic


def random_init_state_dict(arch: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def pretrain_init_state_dict(arch: str, preset: str, seed: int) -> dict:
    """The backbone a pre-training run of this preset, arch and seed starts from."""
    from densebench.pretrain.trainer import initial_backbone_state, pretrain_config

    cfg, _ = pretrain_config(preset, {"seed": seed}, arch)
    return initial_backbone_state(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-preset", choices=("tiny", "paper"),
                        help="write the initial weights of a pre-training run of this preset instead")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.pretrain_preset:
            state = pretrain_init_state_dict(args.arch, args.pretrain_preset, args.seed)
            what = f"the initial weights of a {args.pretrain_preset} pre-training run"
        else:
            state, what = random_init_state_dict(args.arch, args.seed), "torchvision's init"
    except InputError as exc:
        print(f"random_init: error: {exc}", file=sys.stderr)
        return 1
    torch_save_atomic(state, args.out)
    print(f"wrote random-init {args.arch} (seed {args.seed}, {what}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
