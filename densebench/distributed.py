"""torch.distributed set-up shared by pre-training and every protocol.

Runs under `torchrun` (env:// rendezvous) or as a single plain process. NCCL on CUDA,
gloo on CPU. Nothing home-made: this is a thin layer over torch.distributed.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> torch.device:
    """Initialise the process group when launched by torchrun; return this process's device."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) from all ranks along dim 0, no grad."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def device_description(device: torch.device) -> str:
    """'8x NVIDIA H100 80GB HBM3' or 'cpu', as stored in result records."""
    if device.type == "cuda":
        return f"{world_size()}x {torch.cuda.get_device_name(device)}"
    return "cpu" if world_size() == 1 else f"{world_size()}x cpu"
