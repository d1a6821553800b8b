"""Write a seeded random-init torchvision ResNet as a checkpoint: the baseline row of every table.

Usage: python -m densebench.evaluate.random_init --arch resnet18 --seed 0 --out FILE.pth
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch
import torchvision

from densebench.io import torch_save_atomic


def random_init_state_dict(arch: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch_save_atomic(random_init_state_dict(args.arch, args.seed), args.out)
    print(f"wrote random-init {args.arch} (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
