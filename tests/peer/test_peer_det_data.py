"""The detection data pipeline against mmdet 2.28.2's (issue 17, item 1).

The train pipelines of both MMSelfSup 0.x configs (LoadImageFromFile, LoadAnnotations,
Resize multiscale 'value' keep_ratio, RandomFlip 0.5, Normalize RGB ImageNet, Pad 32) run on the
same image file and annotation, with the random draws injected on both sides (the scale through
`results['scale']` / densebench's `torch_choice`, the flip through `results['flip']` / flip_prob
0 or 1). Image size, padding, scale factor, boxes, labels and masks are equal; the input tensors
differ only by mmdet resizing the uint8 image with OpenCV (rounded to uint8) where densebench
resizes floats: the bound is one grey level (1/57.12 in normalised units), pinned below.
"""
import numpy as np
import pytest
import torch
from mmdet.datasets.pipelines import Compose
from PIL import Image

from densebench.data.coco import segmentation_to_mask
from densebench.protocols import detection

IMG_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
GREY_LEVEL = 1.0 / 57.12


def mmdet_train_pipeline(scale, with_mask):
    """faster_rcnn_r50_c4_mstrain_24k_voc0712.py / mask_rcnn_r50_fpn_mstrain_1x_coco.py train_pipeline
    up to Pad (DefaultFormatBundle/Collect only convert types)."""
    return Compose([
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
        dict(type="Resize", img_scale=[scale], multiscale_mode="value", keep_ratio=True),
        dict(type="RandomFlip", flip_ratio=0.5),
        dict(type="Normalize", **IMG_NORM),
        dict(type="Pad", size_divisor=32),
    ])


@pytest.mark.parametrize("size", [(101, 157), (90, 64)])      # 157 * 120/101 = 186.5: rounds to 187
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_train_input_boxes_masks_and_meta_equal_mmdet(tmp_path, size, flip, with_mask):
    height, width = size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    boxes = np.array([[3.0, 5.0, 40.0, 60.0], [20.5, 10.25, width - 1.0, height - 2.0]], dtype=np.float32)
    labels = np.array([4, 11])
    polygons = [[[3.0, 5.0, 40.0, 5.0, 40.0, 60.0, 3.0, 60.0]],
                [[20.5, 10.25, width - 1.0, 30.0, width - 10.0, height - 2.0]]]
    short, long = 120, 200

    results = dict(img_prefix=None, img_info=dict(filename=str(path), height=height, width=width),
                   ann_info=dict(bboxes=boxes.copy(), labels=labels.copy(), masks=polygons),
                   bbox_fields=[], mask_fields=[], seg_fields=[], scale=(long, short), flip=flip,
                   flip_direction="horizontal")
    reference = mmdet_train_pipeline((long, short), with_mask)(results)

    record = detection.DetectionRecord(image_id=0, path=path, width=width, height=height, boxes=boxes,
                                       labels=labels, segmentations=polygons)
    dataset = detection.DetectionDataset([record], flip_prob=1.0 if flip else 0.0,
                                         mask_fn=segmentation_to_mask if with_mask else None)
    image, target, _ = dataset[0]
    transform = detection.DetectionTransform([short], long, 800, 1333).train()
    transform.torch_choice = lambda sizes: short                  # the injected scale draw
    images, targets = transform([image], [target])

    new_h, new_w = reference["img_shape"][:2]
    assert images.image_sizes[0] == (new_h, new_w)
    assert tuple(images.tensors.shape[-2:]) == reference["pad_shape"][:2]
    assert new_w == int(width * min(short / min(size), long / max(size)) + 0.5)
    np.testing.assert_allclose(targets[0]["boxes"].numpy(), reference["gt_bboxes"], rtol=0, atol=1e-4)
    assert np.array_equal(targets[0]["labels"].numpy() - 1, reference["gt_labels"])
    ours_input = images.tensors[0].numpy()
    theirs = reference["img"].transpose(2, 0, 1)
    difference = np.abs(ours_input - theirs)
    assert difference.max() <= GREY_LEVEL + 1e-5                   # OpenCV's uint8 rounding, at most 1 level
    assert difference.mean() < 0.3 * GREY_LEVEL
    assert np.all(difference[:, new_h:, :] == 0) and np.all(difference[:, :, new_w:] == 0)   # zero padding
    if with_mask:
        theirs_masks = reference["gt_masks"].to_ndarray()
        ours_masks = targets[0]["masks"].numpy()
        assert ours_masks.shape[-2:] == (new_h, new_w)
        differing = int((ours_masks != theirs_masks[:, :new_h, :new_w]).sum())
        assert differing == 0
