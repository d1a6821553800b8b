"""Detector construction at full size (ResNet-50), checkpoint placement (res5 included), and the shared parts."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, roi_align

from densebench.errors import InputError
from densebench.evaluate.checkpoint import load_backbone_state_dict
from densebench.protocols import det_coco_maskrcnn_fpn, det_voc0712_c4, detection

RESNET50_BACKBONE_TENSORS = 318          # torchvision resnet50 state_dict without fc
RESNET50_BACKBONE_PARAMS = 23_508_032    # learnable numel without fc
RESNET50_LAYER4_TENSORS = 60


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():                # make BN statistics distinguishable from a fresh init
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(1000)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50_torchvision.pth"
    torch.save(model.state_dict(), path)
    return path


def _build(path, builder, cfg, places):
    state, info = load_backbone_state_dict(path)
    resnet = detection.resnet_from_state_dict(info.arch, state)
    model = builder(resnet, 20 if builder is detection.build_faster_rcnn_c4 else 80, cfg)
    return model, detection.checkpoint_load_report(model, state, places), state


def _no_frozen_bn_and_all_trainable(model):
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_c4_full_size_resnet50(resnet50_checkpoint):
    cfg = det_voc0712_c4.Config()
    model, report, state = _build(resnet50_checkpoint, detection.build_faster_rcnn_c4, cfg,
                                  detection.C4_CHECKPOINT_PLACES)
    # every checkpoint tensor, res5 (layer4) included, sits unchanged in the detector
    assert report["missing"] == []
    assert report["tensors"] == RESNET50_BACKBONE_TENSORS == len(state)
    assert report["parameters"] == RESNET50_BACKBONE_PARAMS
    assert report["per_stage"]["layer4"] == RESNET50_LAYER4_TENSORS
    assert model.roi_heads.box_head.res5[0].conv1.weight.data_ptr() != 0
    torch.testing.assert_close(model.roi_heads.box_head.res5[2].bn3.running_mean, state["layer4.2.bn3.running_mean"])
    _no_frozen_bn_and_all_trainable(model)

    # stages: stride 16, 1024 channels into the RPN; RoIAlign 14 -> res5 -> 2048 x 7 x 7 -> extra BN -> pool
    assert model.backbone.out_channels == 1024
    x = torch.zeros(1, 3, 64, 96)
    shapes = OrderedDict()
    for name, module in model.backbone.named_children():
        x = module(x)
        shapes[name] = tuple(x.shape)
    assert shapes["conv1"] == (1, 64, 32, 48) and shapes["maxpool"] == (1, 64, 16, 24)
    assert shapes["layer1"] == (1, 256, 16, 24) and shapes["layer2"] == (1, 512, 8, 12)
    assert shapes["layer3"] == (1, 1024, 4, 6)
    head = model.roi_heads.box_head
    assert isinstance(head.extra_norm, nn.BatchNorm2d) and head.extra_norm.num_features == 2048
    assert tuple(head.res5(torch.zeros(2, 1024, 14, 14)).shape) == (2, 2048, 7, 7)
    assert tuple(head(torch.zeros(2, 1024, 14, 14)).shape) == (2, 2048)

    rpn = model.rpn
    assert rpn.anchor_generator.num_anchors_per_location() == [15]
    assert rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),)
    assert rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn.nms_thresh == 0.7
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    assert rpn.head.conv[0][0].in_channels == 1024 and rpn.head.cls_logits.out_channels == 15

    roi = model.roi_heads
    assert roi.box_roi_pool.output_size == (14, 14) and roi.box_roi_pool.sampling_ratio == 0
    assert (roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (0.5, 0.5)
    assert roi.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.05, 0.5, 100)
    assert roi.box_predictor.cls_score.out_features == 21 and roi.box_predictor.bbox_pred.out_features == 84

    transform = model.transform
    assert transform.min_size == tuple(range(480, 801, 32)) and transform.max_size == 1333
    assert (transform.test_min_size, transform.test_max_size) == (800, 1333)
    assert transform.size_divisible == 32
    assert transform.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert transform.image_std == pytest.approx([0.229, 0.224, 0.225])


def test_load_report_catches_a_res5_left_at_random_init(resnet50_checkpoint):
    cfg = det_voc0712_c4.Config()
    state, info = load_backbone_state_dict(resnet50_checkpoint)
    resnet = detection.resnet_from_state_dict(info.arch, state)
    resnet.layer4 = torchvision.models.resnet50().layer4           # the classic mistake
    model = detection.build_faster_rcnn_c4(resnet, 20, cfg)
    report = detection.checkpoint_load_report(model, state, detection.C4_CHECKPOINT_PLACES)
    assert len(report["missing"]) > 0 and all(k.startswith("layer4.") for k in report["missing"])
    assert report["per_stage"].get("layer4", 0) == 0
    assert report["tensors"] == RESNET50_BACKBONE_TENSORS - RESNET50_LAYER4_TENSORS


def test_mask_rcnn_fpn_full_size_resnet50(resnet50_checkpoint):
    cfg = det_coco_maskrcnn_fpn.Config()
    model, report, state = _build(resnet50_checkpoint, detection.build_mask_rcnn_fpn, cfg,
                                  detection.FPN_CHECKPOINT_PLACES)
    assert report["missing"] == [] and report["tensors"] == RESNET50_BACKBONE_TENSORS
    assert report["parameters"] == RESNET50_BACKBONE_PARAMS
    _no_frozen_bn_and_all_trainable(model)
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert list(features) == ["0", "1", "2", "3", "pool"]                   # P2..P6
    assert [tuple(f.shape) for f in features.values()] == [(1, 256, s, s) for s in (32, 16, 8, 4, 2)]
    fpn = model.backbone.fpn
    assert [b[0].in_channels for b in fpn.inner_blocks] == [256, 512, 1024, 2048]
    assert all(isinstance(b[1], nn.BatchNorm2d) for b in list(fpn.inner_blocks) + list(fpn.layer_blocks))
    anchors = model.rpn.anchor_generator
    assert anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert anchors.num_anchors_per_location() == [3] * 5
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    roi = model.roi_heads
    assert roi.box_roi_pool.output_size == (7, 7) and roi.mask_roi_pool.output_size == (14, 14)
    assert roi.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    box_convs = [m for m in roi.box_head.modules() if isinstance(m, nn.Conv2d)]
    box_norms = [m for m in roi.box_head.modules() if isinstance(m, nn.BatchNorm2d)]
    box_fcs = [m for m in roi.box_head.modules() if isinstance(m, nn.Linear)]
    assert len(box_convs) == 4 and len(box_norms) == 4 and [f.out_features for f in box_fcs] == [1024]
    mask_convs = [m for m in roi.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(mask_convs) == 4 and sum(isinstance(m, nn.BatchNorm2d) for m in roi.mask_head.modules()) == 4
    assert roi.box_predictor.cls_score.out_features == 81
    mask_logits = roi.mask_predictor(roi.mask_head(torch.zeros(2, 256, 14, 14)))
    assert tuple(mask_logits.shape) == (2, 81, 28, 28)
    assert (roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert model.transform.min_size == (640, 672, 704, 736, 768, 800)


def test_resnet18_channels_come_from_the_model():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    resnet = detection.resnet_from_state_dict("resnet18", state)
    c4 = detection.build_faster_rcnn_c4(resnet, 20, det_voc0712_c4.Config())
    assert c4.backbone.out_channels == 256 and c4.roi_heads.box_head.out_channels == 512
    assert detection.checkpoint_load_report(c4, state, detection.C4_CHECKPOINT_PLACES)["missing"] == []
    resnet = detection.resnet_from_state_dict("resnet18", state)
    fpn = detection.build_mask_rcnn_fpn(resnet, 3, det_coco_maskrcnn_fpn.Config())
    assert [b[0].in_channels for b in fpn.backbone.fpn.inner_blocks] == [64, 128, 256, 512]


def test_sync_batchnorm_conversion_covers_every_norm():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    model = detection.build_mask_rcnn_fpn(detection.resnet_from_state_dict("resnet18", state), 3,
                                          det_coco_maskrcnn_fpn.Config())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)


def test_aligned_roi_align_single_and_multi_level():
    torch.manual_seed(0)
    feature = torch.randn(2, 4, 16, 16)
    boxes = [torch.tensor([[3.3, 4.1, 40.0, 50.5]]), torch.tensor([[0.0, 0.0, 63.0, 30.0], [10.0, 10.0, 20.0, 20.0]])]
    pool = detection.AlignedRoIAlign(["0"], output_size=5, sampling_ratio=0)
    out = pool({"0": feature}, boxes, [(64, 64), (64, 64)])
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    torch.testing.assert_close(out, roi_align(feature, rois, 5, 0.25, 0, aligned=True))
    assert not torch.allclose(out, roi_align(feature, rois, 5, 0.25, 0, aligned=False))
    # multi-level: each box pooled from its FPN level with aligned=True
    feats = OrderedDict((str(i), torch.randn(1, 4, 64 // 2 ** i, 64 // 2 ** i)) for i in range(4))
    big = [torch.tensor([[0.0, 0.0, 250.0, 250.0], [5.0, 5.0, 30.0, 30.0]])]
    multi = detection.AlignedRoIAlign(list(feats), output_size=3, sampling_ratio=0)
    out = multi(feats, big, [(256, 256)])
    levels = multi.map_levels(big)
    for j in range(2):
        level = int(levels[j])
        roi = torch.cat([torch.zeros(1, 1), big[0][j:j + 1]], 1)
        expected = roi_align(feats[str(level)], roi, 3, 1 / 4 / 2 ** level, 0, aligned=True)
        torch.testing.assert_close(out[j:j + 1], expected)


def test_l1_losses():
    logits = torch.randn(6, 3)
    deltas = torch.randn(6, 12)
    labels = [torch.tensor([0, 2, 1]), torch.tensor([0, 0, 2])]
    targets = [torch.randn(3, 4), torch.randn(3, 4)]
    cls_loss, box_loss = detection.fast_rcnn_l1_loss(logits, deltas, labels, targets)
    all_labels, all_targets = torch.cat(labels), torch.cat(targets)
    expected = sum((deltas.view(6, 3, 4)[i, all_labels[i]] - all_targets[i]).abs().sum()
                   for i in range(6) if all_labels[i] > 0) / 6
    torch.testing.assert_close(box_loss, expected)
    torch.testing.assert_close(cls_loss, nn.functional.cross_entropy(logits, all_labels))


def test_schedule_warmup_steps_and_linear_scaling():
    paper = detection.scaled_schedule(0.02, 24000, [18000, 22000], 100, 0.001, 16, 16)
    assert paper.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert paper.lr_at(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert paper.lr_at(100) == pytest.approx(0.02)
    assert paper.lr_at(17999) == pytest.approx(0.02)
    assert paper.lr_at(18000) == pytest.approx(0.002)
    assert paper.lr_at(22000) == pytest.approx(0.0002)
    half = detection.scaled_schedule(0.02, 24000, [18000, 22000], 100, 0.001, 16, 8)
    assert (half.base_lr, half.max_iter, half.steps, half.warmup_iters) == (pytest.approx(0.01), 48000,
                                                                             [36000, 44000], 200)
    # mmdet's group sampler pads each aspect group to whole batches: 1001 + 501 iterations per epoch
    groups = [0] * (16 * 1000 + 1) + [1] * (16 * 500 + 1)
    coco = det_coco_maskrcnn_fpn.train_schedule(det_coco_maskrcnn_fpn.Config(), groups, 16)
    assert coco.max_iter == 12 * 1502 and coco.steps == [8 * 1502, 11 * 1502] and coco.warmup_iters == 1000


def test_reference_total_batch_at_any_gpu_count():
    assert [detection.images_per_gpu_for(16, 0, world, "x") for world in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    assert detection.images_per_gpu_for(16, 2, 1, "x") == 2                 # explicit: the caller scales
    with pytest.raises(InputError, match="images_per_step=16 is not divisible by the 3"):
        detection.images_per_gpu_for(16, 0, 3, "det_voc0712_c4")


def test_grouped_batches():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    sampler = detection.GroupedBatches(groups, 2, seed=3)
    it = iter(sampler)
    batches = [next(it) for _ in range(20)]
    assert all(len(b) == 2 and groups[b[0]] == groups[b[1]] for b in batches)
    it2 = iter(detection.GroupedBatches(groups, 2, seed=3))
    assert [next(it2) for _ in range(20)] == batches                  # deterministic
    resumed = iter(detection.GroupedBatches(groups, 2, seed=3, skip=7))
    assert [next(resumed) for _ in range(13)] == batches[7:]          # resume skips exactly
    ranks = [iter(detection.GroupedBatches(groups, 1, seed=3, rank=r, world_size=2)) for r in range(2)]
    first_pass = [[i for _ in range(6) for i in next(r)] for r in ranks]
    # 11 images over 2 ranks: 6 each, one index repeated to even the shards; together they cover all
    assert set(first_pass[0]) | set(first_pass[1]) == set(range(len(groups)))
    assert len(set(first_pass[0]) & set(first_pass[1])) == 1


def test_transform_uses_test_size_in_eval_and_random_train_sizes():
    transform = detection.DetectionTransform((96, 128), 1000, 64, 1000)
    image = torch.rand(3, 100, 200)
    transform.eval()
    batch, _ = transform([image])
    assert batch.image_sizes[0] == (64, 128)
    transform.train()
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        batch, _ = transform([image], [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}])
        seen.add(batch.image_sizes[0][0])
        assert batch.tensors.shape[-1] % 32 == 0 and batch.tensors.shape[-2] % 32 == 0
    assert seen == {96, 128}


def test_param_groups_without_norm_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = detection.parameter_groups(model, 1e-4, 0.0)
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 2
    assert len(groups[0]["params"]) == 4
    assert len(detection.parameter_groups(model, 1e-4, None)) == 1


def test_dataset_flip_moves_boxes_and_masks_with_the_image(tmp_path):
    from PIL import Image

    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[10:20, 5:25] = 255                                # object at x 5..25, y 10..20
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    record = detection.DetectionRecord(image_id="a", path=path, width=60, height=40,
                                       boxes=np.array([[5.0, 10.0, 25.0, 20.0]], dtype=np.float32),
                                       labels=np.array([3]), segmentations=["box"])

    def mask_fn(_, height, width):
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[10:20, 5:25] = 1
        return mask

    image, target, index = detection.DetectionDataset([record], flip_prob=1.0, mask_fn=mask_fn)[0]
    assert index == 0 and target["labels"].tolist() == [4]           # background is 0
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert (x0, y0, x1, y1) == (35.0, 10.0, 55.0, 20.0)
    assert image[:, 10:20, 35:55].min() == 1.0 and image[:, :, :35].max() == 0.0
    # masks are flipped by the transform after their (nearest) resize, as mmdet orders it
    assert bool(target["flip_masks"]) and target["masks"][0, 10:20, 5:25].all() and target["masks"].sum() == 200
    transform = detection.DetectionTransform([40], 60, 40, 60).train()
    _, resized = transform.resize(image, target)
    assert "flip_masks" not in resized and resized["masks"][0, 10:20, 35:55].all() and resized["masks"].sum() == 200
    plain, target, _ = detection.DetectionDataset([record])[0]
    assert target["boxes"][0].tolist() == [5.0, 10.0, 25.0, 20.0] and plain[:, 10:20, 5:25].min() == 1.0


def test_coco_training_images_filtered_as_mmdet():
    """mmdet keeps an image with any annotation (crowd-only included: it gives negatives) of at least 32 px."""
    from types import SimpleNamespace
    coco = SimpleNamespace(imgToAnns={1: [{"iscrowd": 1}], 2: [], 3: [{"iscrowd": 0}]})
    image = lambda i, w=100, h=80: SimpleNamespace(image_id=i, width=w, height=h)  # noqa: E731
    assert det_coco_maskrcnn_fpn.kept_for_training(coco, image(1))
    assert not det_coco_maskrcnn_fpn.kept_for_training(coco, image(2))
    assert not det_coco_maskrcnn_fpn.kept_for_training(coco, image(4))
    assert not det_coco_maskrcnn_fpn.kept_for_training(coco, image(3, w=31))


def test_boxes_decoded_in_float32_under_autocast():
    """torchvision decodes in the deltas' dtype; under AMP that is float16 (0.5 px steps near 1000)."""
    coder = detection.Float32BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = torch.randn(50, 4).bfloat16()
    boxes = torch.rand(50, 4) * 500 + torch.tensor([700.0, 700.0, 1200.0, 1200.0])
    decoded = coder.decode(deltas, [boxes])
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, coder.decode(deltas.float(), [boxes]))
    anchors = detection.ReferenceAnchorGenerator(((32,),), ((0.5, 1.0, 2.0),), (16,))
    from torchvision.models.detection.image_list import ImageList
    out = anchors(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), [torch.zeros(1, 1, 4, 4, dtype=torch.float16)])
    assert out[0].dtype == torch.float32
