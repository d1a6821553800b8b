"""One DenseCL training step (forward, backward, SGD step): densebench vs MMPreTrain's DenseCL.

Same batch, same threads, same backbone, same weights and queues, measured in one process;
prints the time per step of each and the ratio (MMPreTrain time / ours). MMPreTrain runs as
its published config does (fp32, NCHW); ours runs with the trainer's defaults for the device
(channels_last; bf16 autocast on CUDA, fp32 on CPU).
Without mmpretrain importable, only our timings are printed (and the ratio against our own
step in plain fp32 NCHW). On CUDA ours is timed eager and replayed from a CUDA graph
(GraphedTrainStep, what the trainer runs on one GPU; `--cuda-graph`); `--compile both` adds ours
with torch.compile'd encoders (PretrainConfig.compile). One-off warm-ups (compilation, the CUDA
graph's eager steps and capture) are reported apart and excluded from the timings.

    OMP_NUM_THREADS=2 python benchmarks/pretrain_step.py --arch resnet50 --size 224 --batch 32
    PYTHONPATH=/tmp/mmpt python benchmarks/pretrain_step.py --device cuda --arch resnet50 --size 224 --batch 64 --queue-len 65536
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densebench.pretrain.model import DenseCL  # noqa: E402
from densebench.pretrain.step import GraphedTrainStep, train_step  # noqa: E402
from densebench.pretrain.trainer import PretrainConfig, resolve_device_flags  # noqa: E402
from densebench.system import retain_freed_memory  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps, device, warmup: int, iters: int):
    """Median seconds per step of each function, measured alternately so that load changes on
    a shared machine hit both alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    sync(device)
    times = [[] for _ in steps]
    for _ in range(iters):
        for step, bucket in zip(steps, times):
            start = time.perf_counter()
            step()
            sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def our_step_fn(model, optimizer, im_q, im_k, perm, bf16, channels_last, cuda_graph=False):
    if channels_last:
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    if cuda_graph:
        graphed = GraphedTrainStep(model, optimizer, bf16)
        return lambda: graphed(im_q, im_k, perm, 0.5, 1)
    return lambda: train_step(model, optimizer, im_q, im_k, perm, 0.5, 1, bf16)


def warmed(step, device: torch.device, what: str, calls: int = 5):
    """Run the step until its one-off work is done (torch.compile building both encoders'
    graphs; the CUDA-graph step's eager steps and its capture), so that none of it falls into
    the timed iterations; prints how long that took."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    print(f"{what} warm-up ({calls} steps): {time.perf_counter() - start:.1f} s (not timed)")
    return step


def their_step_fn(theirs, optimizer, im_q, im_k, perm):
    from densebench.pretrain.mmpretrain_reference import mmpretrain_losses

    def step():
        losses = mmpretrain_losses(theirs, im_q, im_k, perm)
        optimizer.zero_grad(set_to_none=True)
        (losses["loss_single"] + losses["loss_dense"]).backward()
        optimizer.step()
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--queue-len", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set by OMP_NUM_THREADS)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="ours: auto = the trainer's default (on, CUDA and CPU)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="ours: auto = the trainer's default (on with CUDA)")
    parser.add_argument("--compile", choices=("auto", "on", "off", "both"), default="auto",
                        help="ours with torch.compile'd encoders: both = time eager and compiled; auto = off")
    parser.add_argument("--cuda-graph", choices=("auto", "on", "off", "both"), default="auto",
                        help="ours replayed from a CUDA graph (GraphedTrainStep): both = time eager and "
                             "graphed; auto = both with CUDA, off on CPU")
    args = parser.parse_args()
    retained = retain_freed_memory()          # as the densebench CLI does; both steps run in this process
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    default_bf16, default_channels_last = resolve_device_flags(PretrainConfig(), device)   # the trainer's
    bf16 = default_bf16 if args.bf16 == "auto" else args.bf16 == "on"
    channels_last = default_channels_last if args.channels_last == "auto" else args.channels_last == "on"
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    ours = DenseCL(args.arch, queue_len=args.queue_len).to(device).train()
    im_q = torch.randn(args.batch, 3, args.size, args.size, device=device)
    im_k = torch.randn(args.batch, 3, args.size, args.size, device=device)
    perm = torch.randperm(args.batch)
    name = torch.cuda.get_device_name(device) if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.arch}, batch {args.batch}, {args.size}px, queue {args.queue_len}; "
          f"freed memory retained: {retained}")

    theirs = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from densebench.pretrain.mmpretrain_reference import build_mmpretrain_densecl

            theirs = build_mmpretrain_densecl(ours, args.arch).to(device)
    except ImportError as exc:
        print(f"mmpretrain not importable ({exc}); timing ours only")

    our_model = ours
    if channels_last:
        our_model = ours.to(memory_format=torch.channels_last)
    compile_mode = "off" if args.compile == "auto" else args.compile
    graph_mode = ("both" if on_cuda else "off") if args.cuda_graph == "auto" else args.cuda_graph
    if graph_mode != "off" and not on_cuda:
        parser.error("--cuda-graph needs --device cuda")
    variants = [(c, False) for c in {"off": [False], "on": [True], "both": [False, True]}[compile_mode]]
    if graph_mode == "on":
        variants = [(False, True)]
    elif graph_mode == "both":
        variants.append((False, True))
    steps, labels = [], []
    for use_compile, use_graph in variants:
        changed = use_compile or use_graph
        model = copy.deepcopy(our_model) if len(variants) > 1 and changed else our_model
        optimizer = torch.optim.SGD(model.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        step = our_step_fn(model, optimizer, im_q, im_k, perm, bf16, channels_last, use_graph)
        if use_compile:
            model.compile_encoders()
            step = warmed(step, device, "torch.compile", calls=3)
        if use_graph:
            step = warmed(step, device, "CUDA graph")
        steps.append(step)
        labels.append(f"ours (bf16={bf16}, channels_last={channels_last}, "
                      + ("CUDA graph)" if use_graph else f"compile={use_compile})"))
    if theirs is not None:
        their_params = [p for p in theirs.parameters() if p.requires_grad]
        their_opt = torch.optim.SGD(their_params, lr=0.03, momentum=0.9, weight_decay=1e-4)
        steps.append(their_step_fn(theirs, their_opt, im_q, im_k, perm))
        baseline = "mmpretrain DenseCL (fp32, NCHW)"
    else:
        # baseline in the same process: our own step in plain fp32 NCHW
        torch.manual_seed(0)
        plain = DenseCL(args.arch, queue_len=args.queue_len).to(device).train()
        plain_opt = torch.optim.SGD(plain.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        steps.append(our_step_fn(plain, plain_opt, im_q, im_k, perm, False, False))
        baseline = "ours fp32 NCHW"
    *t_ours, t_base = time_interleaved(steps, device, args.warmup, args.iters)
    for label, seconds in zip(labels, t_ours):
        print(f"{label:64s} {seconds * 1000:9.1f} ms/step  {args.batch / seconds:8.1f} pairs/s")
    print(f"{baseline:64s} {t_base * 1000:9.1f} ms/step  {args.batch / t_base:8.1f} pairs/s")
    for label, seconds in zip(labels, t_ours):
        print(f"ratio {baseline.split(' (')[0]} / {label}: {t_base / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
