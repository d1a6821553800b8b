"""Forward and inference of densebench's detectors against mmdet 2.28.2 (issue 17, item 2).

The reference models are built by mmdet's `build_detector` from the MMSelfSup 0.x benchmark
configs (written out in peer_det_reference.py), given random weights (fixed seeds) with BN
statistics calibrated so activations stay O(1); their state dicts are mapped onto densebench's
detectors. The same padded, normalised input then gives the same backbone/FPN features, RPN
outputs, anchors, proposals (boxes and scores), final boxes/scores/labels and (Mask R-CNN)
binary masks pasted into the original image. Inputs are small (C4 120x152 in a 128x160 batch,
FPN 150x200 in 160x224, so P6 has an odd size) and the RPN keeps 50/100 proposals at test time
(config max_per_img; same code path) so that res5 runs on few RoIs on CPU.
"""
import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

import peer_det_reference as R

C4_INPUT = dict(padded=(128, 160), image=(120, 152), original=(96, 122))
FPN_INPUT = dict(padded=(160, 224), image=(150, 200), original=(120, 160))


def setup(pair, shapes, seed):
    x = R.padded_input(seed, shapes["padded"], shapes["image"])
    meta = R.image_meta(shapes["image"], shapes["original"], shapes["padded"])
    ref, ours = pair(x, meta)
    return ref, ours, x, meta


@pytest.fixture(scope="module")
def c4():
    return setup(R.c4_pair, C4_INPUT, 3)


@pytest.fixture(scope="module")
def fpn():
    return setup(R.fpn_pair, FPN_INPUT, 4)


def our_proposals(model, x, image_size, features):
    """densebench's RPN step by step (what RegionProposalNetwork.forward does), keeping the scores."""
    rpn = model.rpn
    feature_list = list(features.values())
    images = ImageList(x, [image_size])
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(images, feature_list)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
    (boxes,), (scores,) = rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)
    return anchors[0], boxes, scores


def compare_inference(ref, ours, x, meta, features_ref, features_ours):
    image_size = meta["img_shape"][:2]
    for level_ref, level_ours in zip(features_ref, features_ours.values()):
        torch.testing.assert_close(level_ours, level_ref, rtol=0, atol=1e-5)
    cls_ref, reg_ref = ref.rpn_head(features_ref)
    cls_ours, reg_ours = ours.rpn.head(list(features_ours.values()))
    for a, b in zip(cls_ours + reg_ours, cls_ref + reg_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    sizes = [level.shape[-2:] for level in features_ref]
    anchors_ref = torch.cat(ref.rpn_head.prior_generator.grid_priors(sizes, device=x.device))
    anchors, boxes, scores = our_proposals(ours, x, image_size, features_ours)
    torch.testing.assert_close(anchors, anchors_ref, rtol=0, atol=1e-4)
    proposals_ref = ref.rpn_head.simple_test_rpn(features_ref, [meta])[0]
    torch.testing.assert_close(boxes, proposals_ref[:, :4], rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, proposals_ref[:, 4], rtol=0, atol=1e-5)
    det_boxes, det_labels = ref.roi_head.simple_test_bboxes(features_ref, [meta], [proposals_ref],
                                                            ref.roi_head.test_cfg, rescale=True)
    result, _ = ours.roi_heads(features_ours, [boxes], [image_size])
    result = ours.transform.postprocess(result, [image_size], [meta["ori_shape"][:2]])[0]
    assert len(result["boxes"]) == len(det_boxes[0]) > 10
    torch.testing.assert_close(result["boxes"], det_boxes[0][:, :4], rtol=0, atol=1e-4)
    torch.testing.assert_close(result["scores"], det_boxes[0][:, 4], rtol=0, atol=1e-5)
    assert torch.equal(result["labels"] - 1, det_labels[0])
    return result, det_boxes, det_labels


@torch.no_grad()
def test_c4_inference_equals_mmdet(c4):
    ref, ours, x, meta = c4
    compare_inference(ref, ours, x, meta, ref.extract_feat(x), {"0": ours.backbone(x)})


@torch.no_grad()
def test_mask_rcnn_fpn_inference_and_masks_equal_mmdet(fpn):
    ref, ours, x, meta = fpn
    features_ref = ref.extract_feat(x)
    result, det_boxes, det_labels = compare_inference(ref, ours, x, meta, features_ref, ours.backbone(x))
    segms = ref.roi_head.simple_test_mask(features_ref, [meta], det_boxes, det_labels, rescale=True)[0]
    masks = (result["masks"][:, 0] >= 0.5).numpy()                    # coco_results_converter's threshold
    labels = result["labels"].numpy() - 1
    assert sum(len(s) for s in segms) == len(masks)
    for c, segm in enumerate(segms):                                   # mmdet groups the masks by class
        mine = masks[labels == c]
        assert mine.shape == (len(segm),) + meta["ori_shape"][:2]
        assert np.array_equal(mine, np.array(segm).reshape(mine.shape)), f"class {c}"
    assert masks.sum() > 1000


def test_fpn_anchors_on_every_level_equal_mmdet_for_odd_grid_sizes():
    """Fixed strides 4..64 and unrounded base anchors (torchvision: padded size // grid, rounded)."""
    ref = R.build_reference(R.fpn_cfg(), 0)
    ours, _ = R.our_fpn()
    for padded in [(160, 224), (96, 352), (224, 96)]:                # P6 grids 3x4, 2x6, 4x2
        sizes = [torch.Size((-(-padded[0] // s), -(-padded[1] // s))) for s in (4, 8, 16, 32)]
        sizes.append(torch.Size(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2)))
        features = [torch.zeros((1, 1) + tuple(s)) for s in sizes]
        anchors = ours.rpn.anchor_generator(ImageList(torch.zeros((1, 3) + padded), [padded]), features)[0]
        reference = torch.cat(ref.rpn_head.prior_generator.grid_priors(sizes, device="cpu"))
        torch.testing.assert_close(anchors, reference, rtol=0, atol=1e-4)


def test_mask_rcnn_initialisation_distributions_equal_mmdet():
    """Same initialiser for every head tensor: standard deviation within 3% for the weights, zero
    biases where mmdet's are zero (FPN Xavier, fc Xavier, mask logits over fan_out = classes)."""
    ref = R.build_reference(R.fpn_cfg(num_classes=80), 0)
    ours, _ = R.our_fpn(num_classes=80)
    ours_state = ours.state_dict()
    weights = 0
    for name, expected in R.fpn_state_dict(ref).items():
        if name.startswith("backbone.body.") or not name.endswith(("weight", "bias")):
            continue
        mine = ours_state[name]
        if "mask_fcn_logits" in name or "bbox_pred" in name:           # drop the unused background slot
            skip = 4 if "bbox_pred" in name else 1
            expected, mine = expected[skip:], mine[skip:]
        if name.endswith("bias") and float(expected.abs().max()) == 0:
            assert float(mine.abs().max()) == 0, name
        elif name.endswith("weight") and expected.dim() > 1 and expected.numel() >= 5000:   # std known to ~1%
            assert float(mine.std()) == pytest.approx(float(expected.std()), rel=0.03), name
            weights += 1
    assert weights >= 17
