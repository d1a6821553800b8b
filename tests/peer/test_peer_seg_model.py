"""FCN R50-D8 model, inference and loss (VOC12-Aug and Cityscapes) against mmseg 0.30.

The reference is mmseg's EncoderDecoder built by `build_segmentor` from the benchmark config
(tests/peer/seg_reference.py; SyncBN -> BN in one process) with random weights; its state dict is
mapped onto densebench's FCNSegmentor (strict load, so every tensor has its counterpart). Small
inputs (64-112 px) keep a ResNet-50 at output stride 8 fast on CPU; the window geometry of slide
inference is checked at the config's real crop, stride and test size with a cheap stand-in network.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from densebench.protocols import segmentation as seg
from seg_reference import BENCHMARKS, build_reference, reference_to_densebench

BENCHMARK_NAMES = ["voc12aug", "cityscapes"]


@functools.lru_cache(maxsize=None)
def _pair(benchmark: str, seed: int = 0):
    """The reference model and densebench's with the reference's (random) weights (built once per
    benchmark; tests set the mode they need and never change weights)."""
    torch.manual_seed(seed)
    reference = build_reference(benchmark)
    cfg = BENCHMARKS[benchmark]["densebench"]()
    ours = seg.FCNSegmentor(seg.build_dilated_resnet("resnet50"), cfg.num_classes, cfg.head_channels,
                            cfg.aux_channels, cfg.dropout, cfg.align_corners)
    # random BN statistics and affine parameters, so eval-mode BN is not the identity
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    ours.load_state_dict(reference_to_densebench(reference.state_dict()), strict=True)
    return reference, ours, cfg


def _meta(height: int, width: int, original=None):
    original = original or (height, width)
    return [dict(ori_shape=(*original, 3), img_shape=(height, width, 3), pad_shape=(height, width, 3),
                 flip=False, scale_factor=np.ones(4, np.float32))]


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
def test_model_structure_and_parameter_count(benchmark):
    reference, ours, _ = _pair(benchmark)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    assert len(reference.state_dict()) == len(ours.state_dict())


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
@torch.no_grad()
def test_whole_inference_logits_and_prediction(benchmark):
    reference, ours, cfg = _pair(benchmark)
    reference.eval(), ours.eval()
    image = torch.randn(1, 3, 72, 100)
    original = (90, 125)  # the test image before its keep-ratio resize
    ref_logits = reference.whole_inference(image, _meta(72, 100, original), rescale=True)
    our_logits = seg.predict_logits(ours.encode_decode, image, original, cfg.num_classes, "whole", cfg.align_corners)
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-4)
    ref_pred = reference.simple_test(image, _meta(72, 100, original), rescale=True)[0]
    our_pred = seg.predict(ours.encode_decode, image, original, cfg.num_classes, "whole", cfg.align_corners)
    assert np.array_equal(our_pred.numpy(), ref_pred)


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
@torch.no_grad()
def test_slide_inference_with_the_real_network(benchmark):
    """Slide inference through the real network, with a crop/stride scaled down to the small image
    (windows overlap, the last row/column is shifted back to the border)."""
    reference, ours, cfg = _pair(benchmark)
    reference.eval(), ours.eval()
    from mmcv import ConfigDict

    image = torch.randn(1, 3, 70, 101)
    original = (83, 120)
    config_test_cfg = reference.test_cfg
    reference.test_cfg = ConfigDict(mode="slide", crop_size=(48, 48), stride=(32, 32))
    try:
        ref_logits = reference.slide_inference(image, _meta(70, 101, original), rescale=True)
    finally:
        reference.test_cfg = config_test_cfg
    our_logits = seg.predict_logits(ours.encode_decode, image, original, cfg.num_classes, "slide",
                                    cfg.align_corners, (48, 48), (32, 32))
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-4)


class _PixelNet(torch.nn.Module):
    """A cheap stand-in for encode_decode: a fixed 1x1 conv plus a position-dependent term, so every
    window's logits depend on where it was cut from."""

    def __init__(self, num_classes: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(num_classes, 3, generator=generator)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bchw->bkhw", self.weight, crops) + crops.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("height,width", [(1025, 2049), (700, 1300), (512, 683)])
@torch.no_grad()
def test_slide_window_geometry_at_the_config_values(height, width, monkeypatch):
    """Cityscapes test_cfg crop 769 / stride 513 at the real test size (2048x1024 rescaled to the
    (2049, 1025) scale gives 1025x2049) and two others, one smaller than a crop."""
    reference, _, cfg = _pair("cityscapes")
    net = _PixelNet(2)  # geometry does not depend on the class count; 2 keeps the 2049-px maps cheap
    monkeypatch.setattr(reference, "out_channels", 2)
    monkeypatch.setattr(reference, "encode_decode", lambda crop, meta: net(crop))
    image = torch.randn(1, 3, height, width)
    ref_logits = reference.slide_inference(image, _meta(height, width), rescale=False)
    assert reference.test_cfg["crop_size"] == cfg.slide_crop and reference.test_cfg["stride"] == cfg.slide_stride
    our_logits = seg.slide_logits(net, image, 2, cfg.slide_crop, cfg.slide_stride)
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-5)


def test_inference_modes_and_test_scale_match_the_configs():
    for name in BENCHMARK_NAMES:
        reference_cfg, cfg = BENCHMARKS[name], BENCHMARKS[name]["densebench"]()
        test_cfg = reference_cfg["model"]["test_cfg"]
        assert cfg.test_mode == test_cfg["mode"]
        assert tuple(cfg.test_scale) == reference_cfg["test_scale"]
        if test_cfg["mode"] == "slide":
            assert (tuple(cfg.slide_crop), tuple(cfg.slide_stride)) == (test_cfg["crop_size"], test_cfg["stride"])


def _train_batch(num_classes: int, ignored_fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 48, 56, generator=generator)
    labels = torch.randint(0, num_classes, (2, 48, 56), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < ignored_fraction] = 255
    labels[:, 40:, :] = 255  # padding rows, as after Pad
    return images, labels


def _reference_losses(reference, images, labels):
    meta = _meta(*images.shape[-2:]) * images.shape[0]
    losses = reference.forward_train(images, meta, labels[:, None])
    total = sum(value for key, value in losses.items() if "loss" in key)
    return total, losses


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
def test_loss_and_gradients_of_one_step(benchmark):
    """Training mode (BN on batch statistics, the same dropout masks from the same seed): decode
    and auxiliary CE (weights 1.0 / 0.4, ignore 255, averaged over ALL pixels as mmseg 0.x
    CrossEntropyLoss with avg_non_ignore=False), the updated BN statistics and every parameter's
    gradient."""
    reference, ours, cfg = _pair(benchmark)
    reference.train(), ours.train()
    reference.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    images, labels = _train_batch(cfg.num_classes, ignored_fraction=0.3)
    torch.manual_seed(1)
    ref_total, ref_terms = _reference_losses(reference, images, labels)
    torch.manual_seed(1)
    out = ours(images)
    our_total = seg.fcn_loss(out, labels, cfg)
    decode_only = seg.seg_cross_entropy(out[0], labels, cfg.align_corners, cfg.loss_average)
    torch.testing.assert_close(decode_only, ref_terms["decode.loss_ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_total, ref_total, rtol=1e-5, atol=1e-6)
    # BN running statistics after the training forward (momentum 0.1, eps 1e-5 in both)
    ours_state = ours.state_dict()
    for name, buffer in reference_to_densebench(dict(reference.named_buffers())).items():
        torch.testing.assert_close(ours_state[name], buffer, rtol=1e-5, atol=1e-6, msg=name)
    ref_total.backward()
    our_total.backward()
    ours_grads = dict(ours.named_parameters())
    for name, param in reference.named_parameters():
        mapped = next(iter(reference_to_densebench({name: param})))
        torch.testing.assert_close(ours_grads[mapped].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
def test_valid_pixel_average_option_equals_avg_non_ignore(benchmark):
    """The non-default `loss_average: valid` is mmseg's avg_non_ignore=True (mmseg >= 0.23 option)."""
    from mmseg.models.losses import CrossEntropyLoss

    reference = _pair(benchmark)[0]
    cfg = dataclasses.replace(BENCHMARKS[benchmark]["densebench"](), loss_average="valid")
    logits = torch.randn(2, cfg.num_classes, 8, 9)
    _, labels = _train_batch(cfg.num_classes, ignored_fraction=0.3)
    loss_decode = reference.decode_head.loss_decode
    reference.decode_head.loss_decode = CrossEntropyLoss(avg_non_ignore=True)
    try:
        ref = reference.decode_head.losses(logits, labels[:, None])["loss_ce"]
    finally:
        reference.decode_head.loss_decode = loss_decode
    torch.testing.assert_close(seg.seg_cross_entropy(logits, labels, cfg.align_corners, "valid"), ref)
    default = BENCHMARKS[benchmark]["densebench"]()
    assert seg.seg_cross_entropy(logits, labels, cfg.align_corners, default.loss_average) < ref
