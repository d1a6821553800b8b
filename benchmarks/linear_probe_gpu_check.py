"""GPU check of the linear probes: ResNet-50 at 224 with the specified pooling, bf16 + channels_last
against fp32, on the tiny synthetic data. Prints time, head dims and top-1. Last run on an NVIDIA
H200 (one process and torchrun): dims as expected, bf16 top-1 equal to fp32 on every head but feat5
(28 vs 26 %).

    python benchmarks/linear_probe_gpu_check.py                                  # one process
    torchrun --standalone --nproc_per_node=1 benchmarks/linear_probe_gpu_check.py  # DDP + SyncBN path
Expected: head dims 9216/9216/8192/9216/8192, `amp_dtype: bfloat16` in the AMP runtime, AMP and fp32
top-1 close to each other.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from densebench import distributed as du
from densebench.config import make_config
from densebench.data.synth import generate
from densebench.evaluate.context import RunContext
from densebench.evaluate.random_init import random_init_state_dict
from densebench.protocols import linear_imagenet, linear_imagenet_mhead


def main() -> None:
    device = du.init_distributed()
    root = Path(tempfile.gettempdir()) / "densebench_gpu_check"
    data, ckpt = root / "synth", root / "r50.pth"
    if du.is_main() and not ((data / "imagenet").is_dir() and ckpt.exists()):   # also after a failed run
        generate(data, scale="tiny", seed=0)
        torch.save(random_init_state_dict("resnet50", 0), ckpt)
    du.barrier()
    for module, extra in ((linear_imagenet_mhead, {"pooling": "specified"}), (linear_imagenet, {})):
        for amp in (True, False):
            overrides = dict(extra, crop_size=224, resize_size=256, amp=amp, channels_last=amp, epochs=2, lr_steps=[1])
            cfg, _ = make_config(module.Config, module.NAME, "tiny", overrides)
            work = root / f"work_{du.world_size()}_{module.NAME}_{amp}"
            ctx = RunContext(ckpt, data, work, root / "cache", device=device, arch="resnet50", show_progress=False)
            tic = time.time()
            out = module.run(ctx, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if du.is_main():
                top1 = {name: head["top1"] for name, head in out.metrics.items()}
                print(du.world_size(), module.NAME, f"amp={amp}", f"{time.time() - tic:.1f}s",
                      out.extra.get("runtime"), out.extra.get("head_dims"), top1)


if __name__ == "__main__":
    main()
