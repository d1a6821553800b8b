"""Dilated ResNet geometry, FCN heads, strict backbone load, loss, poly schedule and the
sliding-window arithmetic of the segmentation protocols (PROTOCOLS.md 8, 9, 12.10)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from densebench.errors import InputError
from densebench.protocols import seg_cityscapes_fcn, seg_voc12aug_fcn
from densebench.protocols.segmentation import (
    FCNSegmentor, build_dilated_resnet, build_segmentor, fcn_loss, poly_lr, predict, seg_cross_entropy,
    slide_logits, window_boxes,
)

# PROTOCOLS.md 8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation -> per block
# (stride, dilation) of the 3x3 conv of every Bottleneck of ResNet-50
R50_SPEC = {
    "layer1": [(1, 1)] * 3,
    "layer2": [(2, 1)] + [(1, 1)] * 3,
    "layer3": [(1, 1)] + [(1, 2)] * 5,
    "layer4": [(1, 2)] + [(1, 4)] * 2,
}


def test_dilated_resnet50_block_geometry_matches_the_spec():
    model = build_dilated_resnet("resnet50")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)   # standard stem
    for name, expected in R50_SPEC.items():
        stage = getattr(model, name)
        assert len(stage) == len(expected)
        for block, (stride, dilation) in zip(stage, expected):
            assert block.conv2.stride == (stride, stride)
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
            assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)
            if block.downsample is not None:
                assert block.downsample[0].stride == (stride, stride)
    seg = FCNSegmentor(model, 21)
    c3, c4 = seg.backbone_features(torch.zeros(1, 3, 64, 96))
    assert c3.shape[1:] == (1024, 8, 12) and c4.shape[1:] == (2048, 8, 12)       # output stride 8


def test_dilated_resnet50_equals_torchvision_dilation_on_the_same_weights():
    ours = build_dilated_resnet("resnet50").eval()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ref.fc = nn.Identity()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 40, 40)
    seg = FCNSegmentor(ours, 2)
    with torch.no_grad():
        ref_out = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(seg.backbone_features(x)[1], ref_out)


def test_dilated_resnet18_basic_blocks():
    model = build_dilated_resnet("resnet18")
    assert [b.conv1.dilation[0] for b in model.layer3] == [1, 2]
    assert [b.conv1.dilation[0] for b in model.layer4] == [2, 4]
    assert all(b.conv2.dilation == (1, 1) for b in model.layer4)            # mmseg BasicBlock
    assert model.layer3[0].conv1.stride == (1, 1) and model.layer3[0].downsample[0].stride == (1, 1)
    c3, c4 = FCNSegmentor(model, 3).backbone_features(torch.zeros(1, 3, 32, 48))
    assert c3.shape[1:] == (256, 4, 6) and c4.shape[1:] == (512, 4, 6)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_backbone_tensor_is_loaded(arch):
    source = getattr(torchvision.models, arch)()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()
             if not k.startswith("fc.")}
    cfg = seg_voc12aug_fcn.Config()
    seg = build_segmentor(arch, state, cfg)
    loaded = seg.backbone.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    state.pop("layer4.0.conv2.weight")
    with pytest.raises(RuntimeError, match="layer4.0.conv2.weight"):
        build_segmentor(arch, state, cfg)


def test_fcn_heads_structure_for_resnet50():
    seg = FCNSegmentor(build_dilated_resnet("resnet50"), 21)
    dec, aux = seg.decode_head, seg.aux_head
    assert [m[0].in_channels for m in dec.convs] == [2048, 512] and [m[0].out_channels for m in dec.convs] == [512, 512]
    assert all(m[0].kernel_size == (3, 3) and isinstance(m[1], nn.BatchNorm2d) for m in dec.convs)
    assert dec.conv_cat[0].in_channels == 2048 + 512 and dec.conv_cat[0].out_channels == 512
    assert dec.conv_seg.in_channels == 512 and dec.conv_seg.out_channels == 21 and dec.conv_seg.kernel_size == (1, 1)
    assert isinstance(dec.dropout, nn.Dropout2d) and dec.dropout.p == 0.1
    assert len(aux.convs) == 1 and aux.convs[0][0].in_channels == 1024 and aux.convs[0][0].out_channels == 256
    assert aux.conv_cat is None and aux.conv_seg.out_channels == 21 and aux.dropout.p == 0.1


def test_unknown_arch_is_input_error():
    with pytest.raises(InputError):
        build_dilated_resnet("vgg16")


def test_cross_entropy_ignores_255_and_weights_the_aux_head():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 8, 8))
    label[0, :3] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=True)
    logp = F.log_softmax(up, dim=1)
    keep = label != 255
    manual = -logp.permute(0, 2, 3, 1)[keep].gather(1, label[keep][:, None]).mean()
    valid = seg_cross_entropy(logits, label, align_corners=True, average="valid")
    assert valid.item() == pytest.approx(manual.item(), rel=1e-5)
    # the default (mmseg 0.x, avg_non_ignore=False): the valid pixels' sum over ALL pixels
    per_all = seg_cross_entropy(logits, label, align_corners=True)
    assert per_all.item() == pytest.approx(manual.item() * keep.sum().item() / keep.numel(), rel=1e-5)
    cfg = seg_cityscapes_fcn.Config()
    assert cfg.loss_average == "all"
    aux = torch.randn(2, 3, 4, 4)
    expected = per_all + 0.4 * seg_cross_entropy(aux, label, True, "all")
    assert fcn_loss((logits, aux), label, cfg).item() == pytest.approx(expected.item(), rel=1e-5)


def test_poly_schedule():
    assert poly_lr(0, 20000, 0.01, 1e-4, 0.9) == pytest.approx(0.01)
    assert poly_lr(20000, 20000, 0.01, 1e-4, 0.9) == pytest.approx(1e-4)
    assert poly_lr(10000, 20000, 0.01, 1e-4, 0.9) == pytest.approx(0.0099 * 0.5 ** 0.9 + 1e-4)


def test_window_boxes_for_the_cityscapes_test_size():
    boxes = window_boxes(1025, 2049, (769, 769), (513, 513))
    assert len(boxes) == 2 * 4
    assert (0, 769, 0, 769) in boxes and (256, 1025, 1280, 2049) in boxes
    assert all(y2 - y1 == 769 and x2 - x1 == 769 for y1, y2, x1, x2 in boxes)


@pytest.mark.parametrize("size", [(20, 30), (32, 32), (32, 50), (70, 45), (97, 129)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_slide_equals_whole_for_a_net_without_spatial_context(size, align_corners):
    """A 1x1 conv sees one pixel, so every window computes the same logits as the whole image:
    slide and whole inference agree exactly when the windows tile, overlap and average correctly."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 5, 1)
    image = torch.randn(1, 3, *size)
    crop, stride = (32, 32), (21, 21)
    with torch.no_grad():
        whole = net(image)
        slid = slide_logits(net, image, 5, crop, stride)
        torch.testing.assert_close(slid, whole)
        original = (size[0] * 2 + 1, size[1] * 2 - 3)
        pred_whole = predict(net, image, original, 5, "whole", align_corners)
        pred_slide = predict(net, image, original, 5, "slide", align_corners, crop, stride)
    assert pred_whole.shape == original and torch.equal(pred_whole, pred_slide)


def test_slide_detects_a_misplaced_window():
    """The equality above is not trivial: a net that depends on position breaks it."""
    net = nn.Conv2d(3, 2, 3, padding=1)
    image = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert not torch.allclose(slide_logits(net, image, 2, (32, 32), (8, 8)), net(image))
