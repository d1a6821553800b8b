"""Our convolution weight gradients (densebench.pretrain.conv_grad) against direct sums."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densebench.pretrain import conv_grad
from densebench.pretrain.model import ResNetTrunk

# Lavin & Gray (2016), F(4, 3): B^T (6x6) and A^T (4x6), written out independently of the
# module's elementwise formulas
BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                  dtype=torch.float64)


def direct_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, size: int = 3, stride: int = 1) -> torch.Tensor:
    """dW[k, c, r, s] = sum over n, h, w of grad_out[n, k, h, w] * x_padded[n, c, stride h + r, stride w + s],
    in float64, with zero padding size // 2."""
    h, w = grad_out.shape[2:]
    pad = size // 2
    x_pad = F.pad(x.double(), (pad, pad, pad, pad))
    taps = [[torch.einsum("nkhw,nchw->kc", grad_out.double(),
                          x_pad[:, :, r:r + stride * (h - 1) + 1:stride, s:s + stride * (w - 1) + 1:stride])
             for s in range(size)] for r in range(size)]
    return torch.stack([torch.stack(row, -1) for row in taps], -2)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("n,c,k,h,w,channels_last", [
    (2, 3, 5, 7, 9, False),       # neither side a multiple of 4, NCHW
    (4, 16, 8, 16, 12, True),     # whole tiles, NHWC
    (1, 8, 8, 1, 1, True),        # a single pixel: only the centre tap sees data
    (3, 6, 4, 5, 14, False),
])
def test_winograd_weight_grad_matches_the_direct_sum(n, c, k, h, w, channels_last):
    gen = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, c, h, w, generator=gen)
    grad_out = torch.randn(n, k, h, w, generator=gen)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    expected = direct_weight_grad(x, grad_out)
    got = conv_grad.winograd_weight_grad(x, grad_out)
    assert got.shape == (k, c, 3, 3) and got.dtype == torch.float32
    assert relative_error(got, expected) < 2e-5


@pytest.mark.parametrize("h,w,channels_last", [(9, 7, False), (16, 12, True), (1, 2, True)])
def test_im2col_weight_grad_matches_the_direct_sum(h, w, channels_last):
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(3, 5, h, w, generator=gen)
    grad_out = torch.randn(3, 4, (h + 1) // 2, (w + 1) // 2, generator=gen)     # stride 2, padding 1
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    got = conv_grad.im2col_weight_grad(x, grad_out, stride=2)
    assert got.shape == (4, 5, 3, 3)
    assert relative_error(got, direct_weight_grad(x, grad_out, stride=2)) < 1e-6


def test_1x1_weight_grad_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=gen)
    grad_out = torch.randn(3, 4, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    got = conv_grad.gemm_weight_grad_1x1(x, grad_out)
    assert got.shape == (4, 6, 1, 1)
    assert relative_error(got, direct_weight_grad(x, grad_out, size=1)) < 1e-6


@pytest.mark.parametrize("kernel,stride,shape,method", [
    (3, 1, (32, 64, 56, 56), "winograd_weight_grad"),
    (3, 1, (16, 128, 8, 8), "winograd_weight_grad"),      # 1024 pixels
    (3, 1, (8, 128, 8, 8), None),                         # 512 pixels: oneDNN's
    (3, 1, (64, 512, 4, 4), None),                        # maps under 7x7
    (3, 2, (32, 256, 28, 28), "im2col_weight_grad"),
    (3, 2, (32, 128, 56, 56), None),
    (1, 1, (32, 512, 28, 28), "gemm_weight_grad_1x1"),
    (1, 1, (32, 64, 56, 56), None),
    (1, 2, (32, 512, 28, 28), None),                      # strided 1x1 (downsample): oneDNN's
])
def test_weight_grad_method_follows_the_measured_rules(kernel, stride, shape, method):
    conv = torch.nn.Conv2d(shape[1], 8, kernel, stride=stride, padding=kernel // 2, bias=False)
    chosen = conv_grad.weight_grad_method(conv, torch.empty(shape))
    name = getattr(chosen, "func", chosen).__name__ if chosen is not None else None
    assert name == method


def test_transforms_equal_the_published_matrices():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4 * 3 + 2, 5, dtype=torch.float64, generator=gen)        # 3 tiles along dim 1
    windows = x.unfold(1, 6, 4)                                                  # (2, 3, 5, 6)
    expected = torch.einsum("ij,ntcj->intc", BT, windows)
    assert torch.allclose(conv_grad.input_transform(x, 1), expected, rtol=0, atol=1e-12)

    g = torch.randn(2, 4 * 3, 5, dtype=torch.float64, generator=gen)
    blocks = g.unfold(1, 4, 4)                                                   # (2, 3, 5, 4)
    expected = torch.einsum("ji,ntcj->intc", AT, blocks)                         # A = (A^T)^T
    assert torch.allclose(conv_grad.output_grad_transform(g, 1), expected, rtol=0, atol=1e-12)


def calls_counted(monkeypatch):
    """Records (method name, input shape) of every weight gradient we compute instead of oneDNN."""
    calls = []
    choose = conv_grad.weight_grad_method

    def counting(conv, x):
        method = choose(conv, x)
        if method is None:
            return None
        name = getattr(method, "func", method).__name__

        def counted(inp, grad):
            calls.append((name, tuple(inp.shape)))
            return method(inp, grad)
        return counted

    monkeypatch.setattr(conv_grad, "weight_grad_method", counting)
    return calls


def trunk_grads(model, images):
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_()
    out = model(images)
    out.square().mean().backward()
    return out.detach(), images.grad, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_resnet_switch_changes_only_the_chosen_weight_gradients(monkeypatch):
    torch.manual_seed(0)
    model = ResNetTrunk("resnet18").to(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out_ref, dx_ref, grads_ref = trunk_grads(model, images)

    # resnet18: 16 3x3 convolutions in layer1-4 and 3 1x1 downsamples (the 7x7 stem is not eligible)
    assert conv_grad.set_fast_weight_grad(model, True) == 19
    assert list(model.state_dict()) == keys
    calls = calls_counted(monkeypatch)
    out, dx, grads = trunk_grads(model, images)
    # layer1: 4 x 16 x 16 = 1024 pixels, Winograd; the stride-2 3x3 convs: im2col; the other
    # stride-1 3x3 maps are too small, and strided 1x1 ones are left to oneDNN
    assert sorted(calls) == sorted([("winograd_weight_grad", (4, 64, 16, 16))] * 4 + [
        ("im2col_weight_grad", (4, 64, 16, 16)), ("im2col_weight_grad", (4, 128, 8, 8)),
        ("im2col_weight_grad", (4, 256, 4, 4))])
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    winograd_layers = [f"layer1.{b}.conv{i}.weight" for b in (0, 1) for i in (1, 2)]
    for name, grad in grads.items():
        if name in winograd_layers:
            assert not torch.equal(grad, grads_ref[name]), name   # other rounding: the other algorithm ran
        assert relative_error(grad, grads_ref[name]) < 1e-4, name

    assert conv_grad.set_fast_weight_grad(model, False) == 19
    calls.clear()
    out, dx, grads = trunk_grads(model, images)
    assert calls == []
    assert all(torch.equal(grads[name], grads_ref[name]) for name in grads)


def test_switch_leaves_no_grad_and_frozen_convolutions_alone(monkeypatch):
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    biased = torch.nn.Conv2d(8, 8, 3, padding=1)
    net = torch.nn.Sequential(conv, biased)
    assert conv_grad.set_fast_weight_grad(net, True) == 1
    assert type(biased) is torch.nn.Conv2d
    calls = calls_counted(monkeypatch)
    x = torch.randn(4, 8, 16, 16)
    with torch.no_grad():                          # the momentum encoder's forward
        net(x)
    conv.weight.requires_grad_(False)
    net(x.requires_grad_()).sum().backward()
    assert calls == []
    conv.weight.requires_grad_(True)
    net(x).sum().backward()
    assert calls == [("winograd_weight_grad", (4, 8, 16, 16))]


def test_trainer_resolves_the_option_to_float32_cpu_only():
    from densebench.pretrain.trainer import PretrainConfig, resolve_fast_weight_grad

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fast_weight_grad(PretrainConfig(), cpu, bf16=False) is True
    assert resolve_fast_weight_grad(PretrainConfig(fast_weight_grad=True), cpu, bf16=False) is True
    assert resolve_fast_weight_grad(PretrainConfig(fast_weight_grad=False), cpu, bf16=False) is False
    assert resolve_fast_weight_grad(PretrainConfig(), cpu, bf16=True) is False      # autocast: oneDNN's
    assert resolve_fast_weight_grad(PretrainConfig(fast_weight_grad=True), cuda, bf16=False) is False
