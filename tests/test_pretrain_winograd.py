"""Winograd F(4x4, 3x3) weight gradients (densebench.pretrain.winograd) against direct sums."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densebench.pretrain import winograd
from densebench.pretrain.model import ResNetTrunk

# Lavin & Gray (2016), F(4, 3): B^T (6x6) and A^T (4x6), written out independently of the
# module's elementwise formulas
BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                  dtype=torch.float64)


def direct_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """dW[k, c, r, s] = sum over n, h, w of grad_out[n, k, h, w] * x_padded[n, c, h + r, w + s], in float64."""
    h, w = x.shape[2:]
    x_pad = F.pad(x.double(), (1, 1, 1, 1))
    taps = [[torch.einsum("nkhw,nchw->kc", grad_out.double(), x_pad[:, :, r:r + h, s:s + w]) for s in range(3)]
            for r in range(3)]
    return torch.stack([torch.stack(row, -1) for row in taps], -2)


@pytest.mark.parametrize("n,c,k,h,w,channels_last", [
    (2, 3, 5, 7, 9, False),       # neither side a multiple of 4, NCHW
    (4, 16, 8, 16, 12, True),     # whole tiles, NHWC
    (1, 8, 8, 1, 1, True),        # a single pixel: only the centre tap sees data
    (3, 6, 4, 5, 14, False),
])
def test_weight_grad_matches_the_direct_sum(n, c, k, h, w, channels_last):
    gen = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, c, h, w, generator=gen)
    grad_out = torch.randn(n, k, h, w, generator=gen)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    expected = direct_weight_grad(x, grad_out)
    got = winograd.weight_grad(x, grad_out)
    assert got.shape == (k, c, 3, 3) and got.dtype == torch.float32
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 2e-5


def test_transforms_equal_the_published_matrices():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4 * 3 + 2, 5, dtype=torch.float64, generator=gen)        # 3 tiles along dim 1
    windows = x.unfold(1, 6, 4)                                                  # (2, 3, 5, 6)
    expected = torch.einsum("ij,ntcj->intc", BT, windows)
    assert torch.allclose(winograd.input_transform(x, 1), expected, rtol=0, atol=1e-12)

    g = torch.randn(2, 4 * 3, 5, dtype=torch.float64, generator=gen)
    blocks = g.unfold(1, 4, 4)                                                   # (2, 3, 5, 4)
    expected = torch.einsum("ji,ntcj->intc", AT, blocks)                         # A = (A^T)^T
    assert torch.allclose(winograd.output_grad_transform(g, 1), expected, rtol=0, atol=1e-12)


def calls_counted(monkeypatch):
    calls = []
    real = winograd.weight_grad

    def counting(x, grad_out):
        calls.append(tuple(x.shape))
        return real(x, grad_out)

    monkeypatch.setattr(winograd, "weight_grad", counting)
    return calls


def trunk_grads(model, images):
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_()
    out = model(images)
    out.square().mean().backward()
    return out.detach(), images.grad, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_resnet_switch_changes_only_the_large_weight_gradients(monkeypatch):
    torch.manual_seed(0)
    model = ResNetTrunk("resnet18").to(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out_ref, dx_ref, grads_ref = trunk_grads(model, images)

    # resnet18: 3x3 stride-1 convolutions = every conv of layer1-4 except the first of layer2-4
    assert winograd.set_winograd_weight_grad(model, True) == 13
    assert list(model.state_dict()) == keys
    calls = calls_counted(monkeypatch)
    out, dx, grads = trunk_grads(model, images)
    # 4 x 16 x 16 = 1024 pixels in layer1 (worthwhile); layer2-4 (8x8 and below) stay oneDNN's
    assert calls == [(4, 64, 16, 16)] * 4
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    for name, grad in grads.items():
        if name.startswith("layer1.") and ".conv" in name:
            assert not torch.equal(grad, grads_ref[name]), name   # the other algorithm ran
        scale = grads_ref[name].abs().max()
        assert ((grad - grads_ref[name]).abs().max() / scale).item() < 1e-4, name

    assert winograd.set_winograd_weight_grad(model, False) == 13
    calls.clear()
    out, dx, grads = trunk_grads(model, images)
    assert calls == []
    assert all(torch.equal(grads[name], grads_ref[name]) for name in grads)


def test_switch_leaves_no_grad_and_frozen_convolutions_alone(monkeypatch):
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
    net = torch.nn.Sequential(conv, strided)
    assert winograd.set_winograd_weight_grad(net, True) == 1
    assert type(strided) is torch.nn.Conv2d
    calls = calls_counted(monkeypatch)
    x = torch.randn(4, 8, 16, 16)
    with torch.no_grad():                          # the momentum encoder's forward
        net(x)
    conv.weight.requires_grad_(False)
    net(x.requires_grad_()).sum().backward()
    assert calls == []
    conv.weight.requires_grad_(True)
    net(x).sum().backward()
    assert calls == [(4, 8, 16, 16)]
