"""One DenseCL training step (forward, backward, SGD update), run eagerly or replayed from a CUDA graph.

Why a CUDA graph: at the reference's per-GPU batch (32-64 images) a ResNet-50 step in bf16 on a
Hopper GPU launches well over a thousand small kernels (two encoders, backward, the optimizer's
and the momentum update's multi-tensor kernels), and Python launches them more slowly than the
GPU runs them. A captured step is launched as one graph. The graph replays exactly the kernels of
the eager step on the same memory, so the arithmetic is the same; what it needs is a step with no
host synchronisation (the queue pointer stays on the device, see `DenseCL.enqueue`) and inputs
copied into fixed buffers before each replay.

Everything that is a Python number inside the step is frozen into the graph: the learning rate,
the loss weight lambda and the ghost-BN group count. `GraphedTrainStep` captures again whenever
one of them (or an input shape) changes, i.e. once per epoch with the cosine schedule.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from densebench.pretrain.model import DenseCL


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor,
               perm: torch.Tensor, loss_lambda: float, ghost_groups: int, bf16: bool,
               autocast_cache: bool = True) -> Dict[str, torch.Tensor]:
    """Forward (bf16 autocast when asked), backward, SGD step; returns the model's loss dict."""
    with torch.autocast(device_type=im_q.device.type, dtype=torch.bfloat16, enabled=bf16,
                        cache_enabled=autocast_cache):
        out = net(im_q, im_k, perm, loss_lambda, ghost_groups)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


class GraphedTrainStep:
    """`train_step` on CUDA, captured once into a CUDA graph and replayed for every later step.

    The first `eager_steps` calls run eagerly on a side stream (as the CUDA-graph recipe asks):
    they are ordinary training steps that also let cuDNN pick its algorithms and let SGD create
    its momentum buffers. The next call captures the step (nothing runs during a capture) and
    replays it on that call's inputs. The returned tensors live in the graph's memory and are
    overwritten by the next call: read them before calling again.
    """

    def __init__(self, model: DenseCL, optimizer: torch.optim.SGD, bf16: bool, eager_steps: int = 3):
        self.model = model
        self.optimizer = optimizer
        self.bf16 = bf16
        self.eager_steps_left = eager_steps
        self.captures = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.frozen: Optional[Tuple] = None
        self.inputs: Tuple[torch.Tensor, ...] = ()
        self.outputs: Dict[str, torch.Tensor] = {}

    def frozen_values(self, im_q, im_k, loss_lambda, ghost_groups) -> Tuple:
        """What the captured graph has baked in; a change means capturing again."""
        lrs = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        return (im_q.shape, im_q.stride(), im_k.shape, im_k.stride(), float(loss_lambda), int(ghost_groups), lrs)

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor, perm: torch.Tensor,
                 loss_lambda: float, ghost_groups: int) -> Dict[str, torch.Tensor]:
        if self.eager_steps_left > 0:
            self.eager_steps_left -= 1
            return self.eager(im_q, im_k, perm, loss_lambda, ghost_groups)
        frozen = self.frozen_values(im_q, im_k, loss_lambda, ghost_groups)
        if frozen != self.frozen:
            self.capture(im_q, im_k, perm, loss_lambda, ghost_groups)
            self.frozen = frozen
        static_q, static_k, static_perm = self.inputs
        static_q.copy_(im_q, non_blocking=True)
        static_k.copy_(im_k, non_blocking=True)
        # pinned staging: a copy from pageable memory would wait for the previous step to finish
        static_perm.copy_(perm.pin_memory() if perm.device.type == "cpu" else perm, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def eager(self, im_q, im_k, perm, loss_lambda, ghost_groups) -> Dict[str, torch.Tensor]:
        side = torch.cuda.Stream(device=im_q.device)
        side.wait_stream(torch.cuda.current_stream(im_q.device))
        with torch.cuda.stream(side):
            out = train_step(self.model, self.optimizer, im_q, im_k, perm, loss_lambda, ghost_groups, self.bf16)
        torch.cuda.current_stream(im_q.device).wait_stream(side)
        return {name: value.detach() for name, value in out.items()}   # let the autograd graph go

    def capture(self, im_q, im_k, perm, loss_lambda, ghost_groups) -> None:
        """Record one step on fixed input buffers. Gradients are set to None first, so the
        captured backward allocates them inside the graph's memory pool (and overwrites them on
        every replay instead of accumulating)."""
        self.graph, self.outputs = None, {}          # release the previous graph's pool first
        self.inputs = (torch.empty_like(im_q), torch.empty_like(im_k),
                       torch.empty(perm.shape, dtype=perm.dtype, device=im_q.device))
        static_q, static_k, static_perm = self.inputs
        static_q.copy_(im_q)
        static_k.copy_(im_k)
        static_perm.copy_(perm)
        torch.cuda.synchronize(im_q.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may allocate while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            # autocast's weight-cast cache must be off inside a capture (cached casts would
            # outlive the graph's memory)
            out = train_step(self.model, self.optimizer, static_q, static_k, static_perm,
                             loss_lambda, ghost_groups, self.bf16, autocast_cache=False)
        self.outputs = {name: value.detach() for name, value in out.items()}
        self.graph = graph
        self.captures += 1
