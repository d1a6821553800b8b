"""The mmcv op stand-ins (tests/peer/mmcv_ops_standin.py) against the ops' documented semantics.

Every case goes through mmcv's own Python wrappers (mmcv.ops.roi_align, nms, batched_nms,
roi_pool), so the ext signatures are exercised as the reference models use them; the expected
values are worked out by hand (closed forms on ramps, explicit sample points, IoUs of
hand-drawn boxes), and gradients are checked numerically.
"""
import pytest
import torch
from mmcv.ops import batched_nms, nms, roi_align, roi_pool


def ramp(height=16, width=16, a=2.0, b=3.0, c=1.0):
    """f(y, x) = a x + b y + c: bilinear interpolation reproduces it exactly, so RoIAlign's bin
    average equals f at the bin centre (the samples are symmetric around it)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    return (a * x + b * y + c)[None, None], (a, b, c)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_align_of_a_ramp_is_the_ramp_at_the_bin_centres(aligned, scale):
    image, (a, b, c) = ramp()
    box = [v / scale for v in (2.0, 3.0, 10.0, 7.0)]   # input coordinates; on the feature map 2..10 x 3..7
    out_h, out_w = 2, 4
    rois = torch.tensor([[0.0] + box], dtype=torch.float64)
    out = roi_align(image, rois, (out_h, out_w), scale, 0, "avg", aligned)
    shift = 0.5 if aligned else 0.0                    # aligned: pixel i's centre is at continuous i + 0.5
    x1, y1, x2, y2 = (v * scale for v in box)
    bin_w, bin_h = (x2 - x1) / out_w, (y2 - y1) / out_h
    expected = torch.tensor([[a * (x1 - shift + (pw + 0.5) * bin_w) + b * (y1 - shift + (ph + 0.5) * bin_h) + c
                              for pw in range(out_w)] for ph in range(out_h)], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-9)


def test_roi_align_unaligned_clamps_tiny_rois_to_one_pixel():
    image, (a, b, c) = ramp()
    rois = torch.tensor([[0.0, 5.0, 5.0, 5.2, 5.1]], dtype=torch.float64)
    out = roi_align(image, rois, (1, 1), 1.0, 0, "avg", False)
    assert out.item() == pytest.approx(a * 5.5 + b * 5.5 + c)        # RoI widened to 1 x 1
    aligned = roi_align(image, rois, (1, 1), 1.0, 0, "avg", True)
    assert aligned.item() == pytest.approx(a * (5.1 - 0.5) + b * (5.05 - 0.5) + c)


def test_roi_align_adaptive_sampling_takes_ceil_bin_size_points_per_bin():
    """sampling_ratio 0: ceil(bin / 1) samples per bin side. With aligned boxes from 0 and bins of
    4 (resp. 3) pixels, the samples fall exactly on pixel centres 0..3, 4..7 (0..2, 3..5), so the
    output is the plain mean of those pixels of an arbitrary image; a fixed ratio of 1 instead
    samples the bin centre, between two pixels."""
    torch.manual_seed(0)
    image = torch.rand(1, 1, 3, 10, dtype=torch.float64)
    out = roi_align(image, torch.tensor([[0.0, 0, 0, 8, 1]], dtype=torch.float64), (1, 2), 1.0, 0, "avg", True)
    torch.testing.assert_close(out[0, 0, 0], torch.stack([image[0, 0, 0, :4].mean(), image[0, 0, 0, 4:8].mean()]))
    out = roi_align(image, torch.tensor([[0.0, 0, 0, 6, 1]], dtype=torch.float64), (1, 2), 1.0, 0, "avg", True)
    torch.testing.assert_close(out[0, 0, 0], torch.stack([image[0, 0, 0, :3].mean(), image[0, 0, 0, 3:6].mean()]))
    out = roi_align(image, torch.tensor([[0.0, 0, 0, 8, 1]], dtype=torch.float64), (1, 2), 1.0, 1, "avg", True)
    row = image[0, 0, 0]
    torch.testing.assert_close(out[0, 0, 0], torch.stack([(row[1] + row[2]) / 2, (row[5] + row[6]) / 2]))


def test_roi_align_outside_the_image_is_zero_and_batch_index_is_used():
    image = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    image[1] *= 5
    rois = torch.tensor([[1.0, 20, 20, 24, 24], [1.0, 1, 1, 3, 3]], dtype=torch.float64)
    out = roi_align(image, rois, (2, 2), 1.0, 0, "avg", True)
    assert out[0].abs().max().item() == 0.0
    assert torch.allclose(out[1], torch.full_like(out[1], 5.0))


def test_roi_align_negative_size_rejected_when_aligned():
    with pytest.raises(ValueError):
        roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0.0, 3, 3, 1, 1]]), (2, 2), 1.0, 0, "avg", True)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_gradient_is_the_numerical_one(aligned):
    torch.manual_seed(1)
    image = torch.rand(2, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 1.3, 0.7, 6.1, 5.2], [1.0, 0.2, 2.0, 8.5, 6.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, (3, 2), 0.9, 0, "avg", aligned), (image,))


def test_nms_keeps_score_order_and_suppresses_iou_strictly_above_threshold():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.95, 0.7])
    # IoU(0, 1) = 90 / 110 = 0.818; IoU(0, 3) = 50 / 100 = 0.5 exactly; 2 overlaps nothing
    dets, keep = nms(boxes, scores, 0.8)
    assert keep.tolist() == [2, 0, 3]
    assert torch.equal(dets[:, :4], boxes[[2, 0, 3]]) and torch.equal(dets[:, 4], scores[[2, 0, 3]])
    assert nms(boxes, scores, 0.82)[1].tolist() == [2, 0, 1, 3]
    assert nms(boxes, scores, 0.5)[1].tolist() == [2, 0, 3]          # IoU == threshold is kept
    assert nms(boxes, scores, 0.49)[1].tolist() == [2, 0]
    # offset 1 (legacy +1 widths): IoU(0, 1) = 110 / 132 = 0.833 > 0.82
    assert nms(boxes, scores, 0.82, offset=1)[1].tolist() == [2, 0, 3]
    assert nms(boxes[:0], scores[:0], 0.5)[1].numel() == 0


def test_nms_score_threshold_and_max_num():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=torch.float32)
    scores = torch.tensor([0.3, 0.9, 0.6])
    assert nms(boxes, scores, 0.5, score_threshold=0.5)[1].tolist() == [1, 2]
    assert nms(boxes, scores, 0.5, max_num=2)[1].tolist() == [1, 2]


def test_batched_nms_suppresses_within_a_class_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 1])
    dets, keep = batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    assert keep.tolist() == [0, 2]
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.7])


def test_roi_pool_max_over_floor_ceil_bins_with_inclusive_end():
    """mmcv RoIPool: bins over [x1 * s, (x2 + 1) * s), edges floored/ceiled; max and its argmax."""
    image = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6).requires_grad_()
    rois = torch.tensor([[0.0, 0, 0, 3, 3]])
    out = roi_pool(image, rois, (2, 2), 1.0)
    assert out[0, 0].tolist() == [[7.0, 9.0], [19.0, 21.0]]
    out.sum().backward()
    expected = torch.zeros(36)
    expected[[7, 9, 19, 21]] = 1
    assert torch.equal(image.grad.flatten(), expected)
    # scale 0.5, RoI (0, 0, 5, 3) -> [0, 3) x [0, 2), one bin each side
    out = roi_pool(image.detach(), torch.tensor([[0.0, 0, 0, 5, 3]]), (1, 1), 0.5)
    assert out.item() == 8.0
