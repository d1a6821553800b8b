"""Weight gradients of ResNet convolutions by plain GEMMs, for CPU training.

Why: on CPU, oneDNN's backward-weights pass of a 3x3 convolution takes 2-3x as long as its
forward pass, which already runs close to the machine's peak. Over the 13 stride-1 3x3 layers of a ResNet-50
(batch 32, 224 px, NHWC, 2-core AMD EPYC) that is about 1.4 s against 0.67 s of forward per step; the
3 stride-2 3x3 layers take 0.42 s against 0.17 s. Three replacements, each used only on the layer sizes
where it measured faster (`weight_grad_method`):

- 3x3 stride 1: Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for
  Convolutional Neural Networks", CVPR 2016). 36 GEMMs over 4x4 output tiles do a quarter of the
  direct method's multiply-adds, and the input and output-gradient transforms are a few cheap
  elementwise passes. Per layer this measured 1.2-2.3x faster than oneDNN.
- 3x3 stride 2: im2col. The 9 strided taps of the input are copied into one (pixels x 9C) matrix, and
  a single GEMM follows. Measured 1.5-2x faster on 28x28 and 14x14 inputs.
- 1x1 stride 1: the gradient is one GEMM, grad_out^T @ x, on the NHWC tensors as they lie (no copy).
  Measured 1.1-1.4x faster than oneDNN on maps of 28x28 and smaller.

Together, in one ResNet-50 forward + backward (batch 32, 224 px, NHWC, 2 threads, medians of 8 alternating runs):
7.71 s against 8.99 s with oneDNN's weight gradients (Winograd alone: 8.37 s). At the tiny preset's size
(ResNet-18, 64 px, batch 16) the two take the same time.

Only weight gradients change. The forward pass and the input gradient are oneDNN's, so losses are bit-identical
with and without this. Weight gradients differ from oneDNN's by rounding: Winograd's largest error against float64 is
about 5e-6 of the largest entry (oneDNN's own 1e-6 to 8e-6), and the GEMMs' is below 1e-6.

Winograd tiles: F(m=4, r=3) uses 6x6 input tiles with stride 4. In 1-D, with d the 6 input taps of a tile and y the 4 outputs,
y = A^T [(G g) * (B^T d)]. In 2-D, Y = A^T [(G g G^T) * (B^T d B)] A. The gradient of g is then
G^T [sum over tiles of (B^T d B) * (A dY A^T)] G (`winograd_weight_grad`).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

TILE = 4            # outputs per tile side (m)
SPAN = TILE + 2     # inputs per tile side (m + r - 1)

# G of F(4, 3): the filter transform (6 x 3)
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_FILTER_BACK: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _filter_back(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(G kron G)^T, 9 x 36: takes the 36 tile-domain gradients back to the 3x3 taps."""
    key = (device, dtype)
    if key not in _FILTER_BACK:
        g = torch.tensor(_G, dtype=torch.float64)
        _FILTER_BACK[key] = torch.kron(g, g).t().to(device=device, dtype=dtype).contiguous()
    return _FILTER_BACK[key]


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) view of an (N, C, H, W) tensor; free for channels_last, one copy for NCHW."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _every_fourth(t: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """Elements start, start + 4, ... (count of them) along dim, as a view."""
    return t.narrow(dim, start, TILE * (count - 1) + 1)[(slice(None),) * dim + (slice(None, None, TILE),)]


def input_transform(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B^T applied to every 6-long window (stride 4) along dim; returns (6, *x.shape with dim -> tiles).

    x's extent along dim must be 4 * tiles + 2 (already padded). The rows of B^T are
    [4,0,-5,0,1,0], [0,-4,-4,1,1,0], [0,4,-4,-1,1,0], [0,-2,-1,2,1,0], [0,2,-1,-2,1,0], [0,4,0,-5,0,1];
    rows 1/2 and 3/4 share their sums and differences.
    """
    tiles = (x.shape[dim] - 2) // TILE
    d = [_every_fourth(x, dim, j, tiles) for j in range(SPAN)]
    out = x.new_empty((SPAN,) + d[0].shape)
    torch.add(d[4], d[0], alpha=4, out=out[0]).add_(d[2], alpha=-5)
    torch.add(d[4], d[2], alpha=-4, out=out[1])                 # d4 - 4 d2
    odd = torch.add(d[3], d[1], alpha=-4)                       # d3 - 4 d1
    torch.sub(out[1], odd, out=out[2])
    out[1].add_(odd)
    torch.sub(d[4], d[2], out=out[3])                           # d4 - d2
    torch.sub(d[3], d[1], out=odd)                              # d3 - d1
    torch.add(out[3], odd, alpha=-2, out=out[4])
    out[3].add_(odd, alpha=2)
    torch.add(d[5], d[1], alpha=4, out=out[5]).add_(d[3], alpha=-5)
    return out


def output_grad_transform(g: torch.Tensor, dim: int) -> torch.Tensor:
    """A applied to every 4-long block along dim (the transpose of the output transform A^T);
    returns (6, *g.shape with dim -> tiles). g's extent along dim must be a multiple of 4.

    The columns of A^T = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]] give the
    six outputs y0, y0+y1+y2+y3, y0-y1+y2-y3, y0+2y1+4y2+8y3, y0-2y1+4y2-8y3, y3.
    """
    y = [g[(slice(None),) * dim + (slice(i, None, TILE),)] for i in range(TILE)]
    out = g.new_empty((SPAN,) + y[0].shape)
    out[0].copy_(y[0])
    out[5].copy_(y[3])
    torch.add(y[0], y[2], out=out[1])
    odd = torch.add(y[1], y[3])
    torch.sub(out[1], odd, out=out[2])
    out[1].add_(odd)
    torch.add(y[0], y[2], alpha=4, out=out[3])
    torch.add(y[1], y[3], alpha=4, out=odd)                     # y1 + 4 y3
    torch.add(out[3], odd, alpha=-2, out=out[4])
    out[3].add_(odd, alpha=2)
    return out


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of conv2d(x, weight, stride=1, padding=1) for a 3x3 weight, given the
    output gradient; (K, C, 3, 3), a view (the caller copies it into the weight's layout)."""
    n, c, h, w = x.shape
    k = grad_out.shape[1]
    rows, cols = -(-h // TILE), -(-w // TILE)
    x_nhwc, g_nhwc = _nhwc(x), _nhwc(grad_out)
    # zero padding: 1 before (the convolution's own), and after up to whole tiles
    x_pad = F.pad(x_nhwc, (0, 0, 1, TILE * cols + 1 - w, 1, TILE * rows + 1 - h))
    if rows * TILE != h or cols * TILE != w:
        g_nhwc = F.pad(g_nhwc, (0, 0, 0, TILE * cols - w, 0, TILE * rows - h))
    tiles = n * rows * cols
    # (6 col taps, 6 row taps, N, rows, cols, C) -> 36 matrices of tiles x channels
    x_tiles = input_transform(input_transform(x_pad, 1), 3).view(SPAN * SPAN, tiles, c)
    g_tiles = output_grad_transform(output_grad_transform(g_nhwc, 1), 3).view(SPAN * SPAN, tiles, k)
    products = torch.bmm(x_tiles.transpose(1, 2), g_tiles)                     # (36, C, K)
    taps = _filter_back(x.device, x.dtype) @ products.view(SPAN * SPAN, c * k)  # (9, C*K), (col, row) order
    return taps.view(3, 3, c, k).permute(3, 2, 1, 0)


def im2col_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, stride: int) -> torch.Tensor:
    """d(loss)/d(weight) of conv2d(x, weight, stride, padding=1) for a 3x3 weight: the 9 taps of
    x copied side by side into a (pixels x 9C) matrix, then one GEMM with grad_out."""
    n, c = x.shape[:2]
    k, out_h, out_w = grad_out.shape[1:]
    x_pad = F.pad(_nhwc(x), (0, 0, 1, 1, 1, 1))
    columns = x.new_empty(n, out_h, out_w, 9, c)
    for r in range(3):
        for s in range(3):
            columns[:, :, :, 3 * r + s].copy_(
                x_pad[:, r:r + stride * (out_h - 1) + 1:stride, s:s + stride * (out_w - 1) + 1:stride])
    g = _nhwc(grad_out).reshape(-1, k)
    return (g.t() @ columns.view(-1, 9 * c)).view(k, 3, 3, c).permute(0, 3, 1, 2)


def gemm_weight_grad_1x1(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of a 1x1 stride-1 convolution: grad_out^T @ x over all pixels."""
    c, k = x.shape[1], grad_out.shape[1]
    x_rows = _nhwc(x).reshape(-1, c)
    g_rows = _nhwc(grad_out).reshape(-1, k)
    return (g_rows.t() @ x_rows).view(k, c, 1, 1)


WeightGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weight_grad_method(conv: nn.Conv2d, x: torch.Tensor) -> Optional[WeightGrad]:
    """The replacement for oneDNN's weight gradient of `conv` on input `x`, or None where oneDNN's is as fast.

    Measured on 2 AMD EPYC cores (float32, NHWC; ratio = oneDNN time / ours):
    - 3x3 stride 1, Winograd: 1.2-2.3 for N*H*W >= 1024 with H, W >= 7 (N=16: 64ch 16x16 1.16, 128ch 8x8 1.02,
      256ch 14x14 1.84; N=32: 512ch 7x7 2.04). Below that 0.6-1.1: small maps waste most of a 4x4 tile, and few
      pixels leave the 36 GEMMs too short to pay for the transforms (N=16: 256ch 6x6 0.76, 512ch 4x4 0.79).
    - 3x3 stride 2, im2col (N=32): 256ch 28x28 1.5, 512ch 14x14 2.0, 128ch 56x56 1.0 (left to oneDNN).
    - 1x1 stride 1 GEMM (N=32): 1.1-1.4 on maps of 28x28 and smaller, 0.7-1.0 on 56x56.
    """
    n, _, h, w = x.shape
    if conv.kernel_size == (3, 3) and conv.padding == (1, 1):
        if conv.stride == (1, 1) and min(h, w) >= 7 and n * h * w >= 1024:
            return winograd_weight_grad
        if conv.stride == (2, 2) and h * w <= 28 * 28:
            return functools.partial(im2col_weight_grad, stride=2)
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and h * w <= 28 * 28:
        return gemm_weight_grad_1x1
    return None


class _ConvOwnWeightGrad(torch.autograd.Function):
    """conv2d(x, weight, stride, padding): forward and input gradient by ATen, weight gradient by `method`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int], padding: Tuple[int, int],
                method: WeightGrad) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.method = stride, padding, method
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride=ctx.stride, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            # in the weight's own memory format, as autograd would hand it to the optimizer
            grad_weight = torch.empty_like(weight).copy_(ctx.method(x, grad_out))
        return grad_x, grad_weight, None, None, None


class FastGradConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state-dict keys) whose weight gradient comes from
    `weight_grad_method` while `fast_weight_grad` is set, in float32 CPU training where a method
    applies; otherwise it is exactly nn.Conv2d."""

    fast_weight_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_weight_grad and self.weight.requires_grad and torch.is_grad_enabled()
                and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            method = weight_grad_method(self, x)
            if method is not None:
                return _ConvOwnWeightGrad.apply(x, self.weight, self.stride, self.padding, method)
        return super().forward(x)


def eligible(module: nn.Module) -> bool:
    """A bias-free, ungrouped, undilated, zero-padded 3x3 or 1x1 convolution (what a ResNet trunk holds)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size in ((3, 3), (1, 1))
            and module.dilation == (1, 1) and module.groups == 1
            and module.bias is None and module.padding_mode == "zeros")


def set_fast_weight_grad(model: nn.Module, enabled: bool) -> int:
    """Switch every eligible convolution in `model` to (or back from) `weight_grad_method`'s weight gradients.

    The modules become `FastGradConv2d`, which holds no extra state, so parameters,
    optimizer state and checkpoints are untouched. Returns the number of convolutions switched.
    """
    count = 0
    for module in model.modules():
        if eligible(module):
            if type(module) is nn.Conv2d:
                module.__class__ = FastGradConv2d
            if isinstance(module, FastGradConv2d):
                module.fast_weight_grad = enabled
                count += 1
    return count
