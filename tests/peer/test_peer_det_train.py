"""Training targets, losses and gradients of densebench's detectors against mmdet 2.28.2 (issue 17, item 3).

Random sampling is the only thing the two sides cannot share, so both get the same injected
sampler: among the positives (resp. negatives) it keeps those with the highest fixed pseudo-random
priority, as many as mmdet's RandomSampler / torchvision's BalancedPositiveNegativeSampler would
draw (the counts are the same rule). RPN anchors are in the same order on both sides, so their
priority is a function of the anchor index; RoIs come in different orders (mmdet puts the GT boxes
first, torchvision last), so their priority is a function of the box coordinates. The RoI head gets
identical injected proposals. Then, for Mask R-CNN FPN and the VOC Faster R-CNN C4, every loss term
and the gradient of every parameter agree; for C4 the sampled RoIs, their labels and regression
targets are also compared box by box.
Anchor assignment (MaxIoUAssigner, allowed_border 0 for C4 with mmdet's valid flags) is compared
directly, without sampling.
"""
import numpy as np
import pytest
import torch
from mmdet.core import BitmapMasks, anchor_inside_flags, build_assigner, build_bbox_coder
from mmdet.core.bbox.samplers import BaseSampler
from torchvision.models.detection.image_list import ImageList

import peer_det_reference as R


def priority(values: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random number in [0, 1) per row of `values` (any float columns)."""
    weights = torch.tensor([12.9898, 78.233, 37.719, 4.581, 91.17][: values.shape[1]], dtype=torch.float64)
    return torch.frac(torch.sin(values.double() @ weights) * 43758.5453).abs()


def top_by_priority(candidates: torch.Tensor, priorities: torch.Tensor, count: int) -> torch.Tensor:
    if len(candidates) <= count:
        return candidates
    return candidates[priorities[candidates].argsort(descending=True)[:count]]


class PrioritySampler(BaseSampler):
    """mmdet side: RandomSampler's counts, priority instead of chance (`by_index`: anchor index)."""

    def __init__(self, num, pos_fraction, add_gt_as_proposals, by_index, index_offset=0):
        super().__init__(num, pos_fraction, neg_pos_ub=-1, add_gt_as_proposals=add_gt_as_proposals)
        self.by_index = by_index

    def _priorities(self, bboxes):
        if self.by_index:
            return priority(torch.arange(len(bboxes), dtype=torch.float64)[:, None])
        return priority(bboxes[:, :4])

    def _sample_pos(self, assign_result, num_expected, bboxes=None, **kwargs):
        return top_by_priority(torch.nonzero(assign_result.gt_inds > 0).flatten(), self._priorities(bboxes),
                               num_expected)

    def _sample_neg(self, assign_result, num_expected, bboxes=None, **kwargs):
        return top_by_priority(torch.nonzero(assign_result.gt_inds == 0).flatten(), self._priorities(bboxes),
                               num_expected)


class OurPrioritySampler:
    """densebench side: the same rule on torchvision's labels (>= 1 positive, 0 negative)."""

    def __init__(self, num, pos_fraction, priorities_per_image):
        self.num, self.pos_fraction, self.priorities_per_image = num, pos_fraction, priorities_per_image

    def __call__(self, labels):
        positives, negatives = [], []
        for label, priorities in zip(labels, self.priorities_per_image()):
            pos = top_by_priority(torch.where(label >= 1)[0], priorities, int(self.num * self.pos_fraction))
            neg = top_by_priority(torch.where(label == 0)[0], priorities, self.num - len(pos))
            positives.append(torch.zeros_like(label, dtype=torch.uint8).index_fill_(0, pos, 1))
            negatives.append(torch.zeros_like(label, dtype=torch.uint8).index_fill_(0, neg, 1))
        return positives, negatives


def ground_truth(image_size, seed):
    """Boxes of varied sizes, labels and polygon-free binary masks (an ellipse inside each box)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = image_size
    boxes = []
    for _ in range(4):
        bw, bh = (torch.rand(2, generator=generator) * torch.tensor([w * 0.6, h * 0.6]) + 12).tolist()
        x0 = float(torch.rand(1, generator=generator)) * (w - bw)
        y0 = float(torch.rand(1, generator=generator)) * (h - bh)
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    boxes = torch.tensor(boxes)
    labels = torch.tensor([0, 2, 1, 2])
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)
    return boxes, labels, torch.stack(masks).to(torch.uint8)


def injected_proposals(gt_boxes, image_size, seed, copies=20, num_random=100):
    """GT boxes jittered (many positives) plus random boxes (negatives), clipped to the image."""
    generator = torch.Generator().manual_seed(seed)
    h, w = image_size
    jittered = gt_boxes.repeat(copies, 1) + torch.randn(copies * len(gt_boxes), 4, generator=generator) * 8
    xy = torch.rand(num_random, 2, generator=generator) * torch.tensor([w - 8.0, h - 8.0])
    random = torch.cat([xy, xy + 4 + torch.rand(num_random, 2, generator=generator) * 80], dim=1)
    boxes = torch.cat([jittered, random])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
    return boxes[keep]


LOSS_NAMES = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox",
              "loss_classifier": "loss_cls", "loss_box_reg": "loss_bbox", "loss_mask": "loss_mask"}


def test_mask_rcnn_losses_targets_and_gradients_equal_mmdet():
    shapes = dict(padded=(160, 224), image=(160, 224), original=(160, 224))   # all anchors valid (index priority)
    x = R.padded_input(5, shapes["padded"], shapes["image"])
    meta = R.image_meta(shapes["image"], shapes["original"], shapes["padded"])
    ref, ours = R.fpn_pair(x, meta, seed=2)
    ref.train()
    ours.train()
    image_size = shapes["image"]
    gt_boxes, gt_labels, gt_masks = ground_truth(image_size, 6)
    proposals = injected_proposals(gt_boxes, image_size, 7)

    ref.rpn_head.sampler = PrioritySampler(256, 0.5, False, by_index=True)
    ref.roi_head.bbox_sampler = PrioritySampler(512, 0.25, True, by_index=False)
    num_anchors = sum(len(a) for a in ref.rpn_head.prior_generator.grid_priors(
        [torch.Size((-(-160 // s), -(-224 // s))) for s in (4, 8, 16, 32, 64)], device="cpu"))
    ours.rpn.fg_bg_sampler = OurPrioritySampler(
        256, 0.5, lambda: [priority(torch.arange(num_anchors, dtype=torch.float64)[:, None])])
    ours.roi_heads.fg_bg_sampler = OurPrioritySampler(512, 0.25, lambda: [priority(torch.cat([proposals, gt_boxes]))])

    features_ref = ref.extract_feat(x)
    reference = reference_losses(
        ref.rpn_head.forward_train(features_ref, [meta], [gt_boxes], None, None, None),
        ref.roi_head.forward_train(features_ref, [meta], [proposals], [gt_boxes], [gt_labels], None,
                                   [BitmapMasks(gt_masks.numpy(), *image_size)]))

    targets = [{"boxes": gt_boxes, "labels": gt_labels + 1, "masks": gt_masks}]
    features = ours.backbone(x)
    _, losses = ours.rpn(ImageList(x, [image_size]), features, targets)
    losses.update(ours.roi_heads(features, [proposals], [image_size], targets)[1])

    assert_losses_and_gradients_equal(ours, losses, ref, reference, R.fpn_state_dict)


def test_faster_rcnn_c4_losses_targets_and_gradients_equal_mmdet():
    """The VOC C4 detector: RPN on res4 with allowed_border 0 (mmdet samples among the anchors inside
    the image only, so both sides' priority is the index among those), the RoI head with res5 +
    extra BN in train mode (batch statistics over the sampled RoIs), no low-quality RoI matches.
    Fewer injected proposals and a smaller RoI sample (48 at 1/4 positive instead of 512) keep res5
    cheap on CPU; the small image has only ~140 anchors inside, so the RPN samples 16 at 1/4
    positive instead of 256 at 1/2: in both samplers the positive cap and the negative fill choose."""
    shapes = dict(padded=(128, 160), image=(120, 152), original=(120, 152))
    x = R.padded_input(8, shapes["padded"], shapes["image"])
    meta = R.image_meta(shapes["image"], shapes["original"], shapes["padded"])
    ref, ours = R.c4_pair(x, meta, seed=4)
    ref.train()
    ours.train()
    image_size = shapes["image"]
    gt_boxes, gt_labels, _ = ground_truth(image_size, 9)
    gt_labels = torch.tensor([0, 14, 6, 19])
    proposals = injected_proposals(gt_boxes, image_size, 11, copies=8, num_random=40)
    rois = torch.cat([proposals, gt_boxes])                           # torchvision's order (GT last)

    assert (ours.rpn.fg_bg_sampler.batch_size_per_image, ours.rpn.fg_bg_sampler.positive_fraction) \
        == (ref.train_cfg.rpn.sampler.num, ref.train_cfg.rpn.sampler.pos_fraction) == (256, 0.5)
    assert (ours.roi_heads.fg_bg_sampler.batch_size_per_image, ours.roi_heads.fg_bg_sampler.positive_fraction) \
        == (ref.roi_head.bbox_sampler.num, ref.roi_head.bbox_sampler.pos_fraction) == (512, 0.25)
    grid = [torch.Size((-(-shapes["padded"][0] // 16), -(-shapes["padded"][1] // 16)))]
    generator = ref.rpn_head.prior_generator
    anchors = generator.grid_priors(grid, device="cpu")[0]
    inside = anchor_inside_flags(anchors, generator.valid_flags(grid, meta["pad_shape"], device="cpu")[0],
                                 image_size, ref.train_cfg.rpn.allowed_border)
    assert 0 < int(inside.sum()) < len(anchors)                        # the border rule removes anchors
    anchor_priority = torch.full((len(anchors),), 2.0, dtype=torch.float64)   # outside first, were it allowed
    anchor_priority[inside] = priority(torch.arange(int(inside.sum()), dtype=torch.float64)[:, None])
    ref.rpn_head.sampler = PrioritySampler(16, 0.25, False, by_index=True)
    ref.roi_head.bbox_sampler = PrioritySampler(48, 0.25, True, by_index=False)
    ours.rpn.fg_bg_sampler = OurPrioritySampler(16, 0.25, lambda: [anchor_priority])
    ours.roi_heads.fg_bg_sampler = OurPrioritySampler(48, 0.25, lambda: [priority(rois)])

    # RoI assignment, sampling and regression targets, matched box by box (the two orders differ)
    assign = ref.roi_head.bbox_assigner.assign(proposals, gt_boxes, None, gt_labels)
    sampled = ref.roi_head.bbox_sampler.sample(assign, proposals, gt_boxes, gt_labels)
    labels_ref, _, targets_ref, _ = ref.roi_head.bbox_head.get_targets([sampled], [gt_boxes], [gt_labels],
                                                                       ref.train_cfg.rcnn)
    targets = [{"boxes": gt_boxes, "labels": gt_labels + 1}]
    boxes_ours, _, labels_ours, targets_ours = ours.roi_heads.select_training_samples([proposals], targets)
    boxes_ref = torch.cat([sampled.pos_bboxes, sampled.neg_bboxes])
    assert len(sampled.pos_bboxes) == 12 and len(boxes_ref) == 48 < len(rois)
    assert int((assign.gt_inds > 0).sum()) + len(gt_boxes) > 12      # the positive cap chose
    order_ref, order_ours = priority(boxes_ref).argsort(), priority(boxes_ours[0]).argsort()
    assert torch.equal(boxes_ours[0][order_ours], boxes_ref[order_ref])
    background = ref.roi_head.bbox_head.num_classes                    # mmdet: background last
    assert torch.equal(labels_ours[0][order_ours], (labels_ref[order_ref] + 1) % (background + 1))
    positive = labels_ref[order_ref] < background
    torch.testing.assert_close(targets_ours[0][order_ours][positive], targets_ref[order_ref][positive],
                               rtol=0, atol=1e-5)

    features_ref = ref.extract_feat(x)
    reference = reference_losses(
        ref.rpn_head.forward_train(features_ref, [meta], [gt_boxes], None, None, None),
        ref.roi_head.forward_train(features_ref, [meta], [proposals], [gt_boxes], [gt_labels]))
    features = {"0": ours.backbone(x)}
    _, losses = ours.rpn(ImageList(x, [image_size]), features, targets)
    losses.update(ours.roi_heads(features, [proposals], [image_size], targets)[1])
    assert_losses_and_gradients_equal(ours, losses, ref, reference, R.c4_state_dict)


def reference_losses(rpn_losses: dict, roi_losses: dict) -> dict:
    """mmdet's loss dicts (RPN terms are per-level lists) -> one scalar per loss term."""
    merged = {**rpn_losses, **roi_losses}
    return {k: sum(v) if isinstance(v, list) else v for k, v in merged.items() if k in LOSS_NAMES.values()}


def assert_losses_and_gradients_equal(ours, losses, ref, reference, state_map):
    """Every loss term to 1e-4 relative (each informative, > 1e-3), then one backward of the summed
    losses: every densebench parameter's gradient equals the mapped reference gradient to 1e-4 of
    its largest entry, and every reference parameter is checked."""
    assert set(losses) == {name for name, ref_name in LOSS_NAMES.items() if ref_name in reference}
    assert len(reference) == len(losses)
    for ours_name in losses:
        ref_name = LOSS_NAMES[ours_name]
        torch.testing.assert_close(losses[ours_name], reference[ref_name].reshape(()), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{ours_name}: {m}")
        assert float(reference[ref_name].detach()) > 1e-3, ref_name

    sum(losses.values()).backward()
    sum(reference.values()).backward()
    ref_grads = state_map(ref, {name: p.grad for name, p in ref.named_parameters()})
    checked = 0
    for name, parameter in ours.named_parameters():
        expected = ref_grads[name]
        scale = float(expected.abs().max()) + 1e-12
        assert float((parameter.grad - expected).abs().max()) <= 1e-4 * scale + 1e-7, name
        checked += 1
    assert checked == len(list(ref.parameters()))


@pytest.mark.parametrize("model", ["c4", "fpn"])
def test_rpn_anchor_assignment_and_targets_equal_mmdet(model):
    """MaxIoUAssigner (min_pos_iou 0.3, low-quality matches to the GT they are best for), mmdet's
    valid flags and (C4) allowed_border 0; the encoded regression targets of the positives."""
    cfg = R.c4_cfg() if model == "c4" else R.fpn_cfg()
    ours, _ = R.our_c4() if model == "c4" else R.our_fpn()
    strides = [16] if model == "c4" else [4, 8, 16, 32, 64]
    from mmdet.core import build_prior_generator
    prior_generator = build_prior_generator(cfg["rpn_head"]["anchor_generator"])
    assigner = build_assigner(cfg["train_cfg"]["rpn"]["assigner"])
    coder = build_bbox_coder(cfg["rpn_head"]["bbox_coder"])
    for seed, (padded, image) in enumerate([((160, 224), (150, 200)), ((128, 192), (100, 181))]):
        sizes = [torch.Size((-(-padded[0] // s), -(-padded[1] // s))) for s in strides]
        if model == "fpn":
            sizes[-1] = torch.Size(((sizes[-2][0] + 1) // 2, (sizes[-2][1] + 1) // 2))
        pad_shape = (-(-image[0] // 32) * 32, -(-image[1] // 32) * 32, 3)
        anchors = torch.cat(prior_generator.grid_priors(sizes, device="cpu"))
        valid = torch.cat(prior_generator.valid_flags(sizes, pad_shape, device="cpu"))
        inside = anchor_inside_flags(anchors, valid, image, cfg["train_cfg"]["rpn"]["allowed_border"])
        gt_boxes, _, _ = ground_truth(image, 10 + seed)
        gt_boxes = torch.cat([gt_boxes, torch.tensor([[3.0, 4.0, 13.0, 12.0]])])      # small: low-quality match
        result = assigner.assign(anchors[inside], gt_boxes)
        expected = torch.full((len(anchors),), -1, dtype=torch.long)
        expected[inside] = result.gt_inds

        features = [torch.zeros((1, 1) + tuple(s)) for s in sizes]
        ours_anchors = ours.rpn.anchor_generator(ImageList(torch.zeros((1, 3) + padded), [image]), features)
        ours.rpn._image_sizes = [image]
        labels, matched = ours.rpn.assign_targets_to_anchors(ours_anchors, [{"boxes": gt_boxes}])
        assert torch.equal(labels[0], (expected > 0).float() - (expected < 0).float())
        positive = expected > 0
        assert torch.equal(matched[0][positive], gt_boxes[expected[positive] - 1])
        assert int(positive.sum()) >= 4 and int((expected < 0).sum()) > 0
        deltas = ours.rpn.box_coder.encode([matched[0][positive]], [ours_anchors[0][positive]])[0]
        torch.testing.assert_close(deltas, coder.encode(anchors[positive], gt_boxes[expected[positive] - 1]),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [(0.7, 0.3, 0.3, True), (0.5, 0.5, 0.5, True), (0.5, 0.5, 0.5, False)])
def test_max_iou_assign_equals_mmdet_on_iou_matrices_with_ties(config):
    """Coarse IoUs (multiples of 0.05) make ties everywhere: several GTs best for one box, several
    boxes best for one GT, values exactly at the thresholds; row scales put some GTs' best IoU
    under min_pos_iou."""
    from densebench.protocols.detection import max_iou_assign
    pos, neg, min_pos, low_quality = config
    assigner = build_assigner(R.assigner(pos, neg, min_pos, low_quality))
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows = 1 + trial % 6                                     # some GTs' best IoU under min_pos_iou
        iou = torch.round(torch.rand(rows, 300, generator=generator) ** 2
                          * torch.rand(rows, 1, generator=generator) * 20) / 20
        expected = assigner.assign_wrt_overlaps(iou).gt_inds
        assert torch.equal(max_iou_assign(iou, pos, neg, min_pos, low_quality), expected)
    assert torch.equal(max_iou_assign(torch.zeros(0, 5), pos, neg, min_pos, low_quality), torch.zeros(5).long())
