"""The mmseg training/test pipeline of the segmentation protocols: keep-ratio rescale, the
cat_max_ratio crop, PhotoMetricDistortion in OpenCV HSV semantics, padding, the seeded sampler."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from densebench.protocols import seg_voc12aug_fcn
from densebench.protocols.segmentation import (
    PIXEL_MEAN, PIXEL_STD, SegTrainDataset, SegValDataset, TrainBatchSampler, hsv_opencv_to_rgb, normalize_image,
    pad_to, photometric_distortion, random_crop, random_rescale, rescale_size, rgb_to_hsv_opencv,
)


def test_rescale_size_keeps_ratio_within_the_bounds():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)      # short edge bound binds
    assert rescale_size(500, 334, (2048, 512)) == (766, 512)      # 500 * 512 / 334 = 766.47
    assert rescale_size(1024, 2048, (2049, 1025)) == (1025, 2049) # Cityscapes test size
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)    # long edge bound binds


def test_random_rescale_ratio_range():
    rng = np.random.default_rng(0)
    image, label = np.zeros((100, 200, 3), np.uint8), np.zeros((100, 200), np.uint8)
    heights = [random_rescale(image, label, (400, 100), (0.5, 2.0), rng)[1].shape[0] for _ in range(50)]
    assert 50 <= min(heights) < 70 and 170 < max(heights) <= 200


def _rule_holds(crop: np.ndarray, ratio: float) -> bool:
    values, counts = np.unique(crop, return_counts=True)
    counts = counts[values != 255]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_random_crop_cat_max_ratio_rule():
    label = np.zeros((40, 40), np.uint8)
    label[:, 20:] = 1
    label[:5] = 255                     # ignored in the ratio
    image = np.zeros((40, 40, 3), np.uint8)
    held = [_rule_holds(random_crop(image, label, (20, 20), 0.75, np.random.default_rng(s))[1], 0.75) for s in range(30)]
    assert all(held)
    plain = [_rule_holds(random_crop(image, label, (20, 20), 1.0, np.random.default_rng(s))[1], 0.75) for s in range(30)]
    assert not all(plain)               # without the rule many crops hold one class only
    single = np.zeros((40, 40), np.uint8)
    img, lab = random_crop(image, single, (20, 30), 0.75, np.random.default_rng(0))
    assert img.shape == (20, 30, 3) and lab.shape == (20, 30)   # rule impossible: a crop anyway
    img, lab = random_crop(image[:10], label[:10], (20, 30), 0.75, np.random.default_rng(0))
    assert lab.shape == (10, 30)        # smaller than the crop: clipped, padded later


def test_rgb_to_hsv_matches_colorsys_in_opencv_units():
    rng = np.random.default_rng(0)
    pixels = np.concatenate([rng.integers(0, 256, size=(4000, 3)),
                             [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0],
                              [0, 0, 255], [255, 0, 1], [1, 0, 255]]]).astype(np.uint8)
    hsv = rgb_to_hsv_opencv(pixels[None])[0].astype(np.int64)
    for (r, g, b), (h, s, v) in zip(pixels, hsv):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert v == round(ev * 255)
        # OpenCV divides through 12-bit fixed-point tables: rounding 0.5 + numerator * 0.5 / 4096,
        # numerator at most 255 for S and 5 * 255 for H (sector offset included)
        assert abs(s - es * 255) <= 0.5 + 255 * 0.5 / 4096 + 1e-9
        assert min(abs(h - eh * 180), 180 - abs(h - eh * 180)) <= 0.5 + 1275 * 0.5 / 4096 + 1e-9
        assert 0 <= h < 180
    assert hsv[-5].tolist() == [0, 255, 255] and hsv[-4].tolist() == [60, 255, 255] and hsv[-3].tolist() == [120, 255, 255]


def test_hsv_to_rgb_matches_colorsys():
    rng = np.random.default_rng(1)
    hsv = np.stack([rng.integers(0, 180, 3000), rng.integers(0, 256, 3000), rng.integers(0, 256, 3000)], -1).astype(np.uint8)
    rgb = hsv_opencv_to_rgb(hsv[None])[0].astype(np.float64)
    expected = np.array([colorsys.hsv_to_rgb(h / 180, s / 255, v / 255) for h, s, v in hsv]) * 255
    # as OpenCV: whole 32-pixel blocks of a row truncate (float32, so within 1e-3 of an integer a
    # value may land on either side), the row's tail (3000 % 32 = 24 pixels) rounds
    vector, tail = slice(0, 3000 // 32 * 32), slice(3000 // 32 * 32, None)
    assert (expected[vector] - rgb[vector]).min() >= -1e-3 and (expected[vector] - rgb[vector]).max() < 1 + 1e-3
    assert np.abs(rgb[tail] - expected[tail]).max() <= 0.5 + 1e-3
    # a hue shift of 60 (OpenCV units, 120 degrees) turns red into green
    red = rgb_to_hsv_opencv(np.array([[[255, 0, 0]]], np.uint8))
    red[..., 0] += 60
    assert hsv_opencv_to_rgb(red).tolist() == [[[0, 255, 0]]]


def test_photometric_distortion_changes_colour_but_keeps_gray_gray():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    outs = [photometric_distortion(colour, np.random.default_rng(s)) for s in range(20)]
    assert all(o.dtype == np.uint8 and o.shape == colour.shape for o in outs)
    assert sum(not np.array_equal(o, colour) for o in outs) >= 15
    gray = np.repeat(rng.integers(0, 256, size=(8, 8, 1)), 3, axis=2).astype(np.uint8)
    for s in range(20):
        out = photometric_distortion(gray, np.random.default_rng(s)).astype(int)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_normalize_and_pad():
    image = np.full((3, 2, 3), 200, np.uint8)
    tensor = normalize_image(image)
    assert tensor.shape == (3, 3, 2)
    assert tensor[0, 0, 0].item() == pytest.approx((200 - PIXEL_MEAN[0]) / PIXEL_STD[0])
    padded, label = pad_to(tensor, np.ones((3, 2), np.uint8), (4, 5))
    assert padded.shape == (3, 4, 5) and label.shape == (4, 5)
    assert torch.all(padded[:, 3:] == 0) and torch.all(padded[:, :, 2:] == 0)
    assert torch.all(label[3:] == 255) and torch.all(label[:, 2:] == 255) and torch.all(label[:3, :2] == 1)


def _write_pair(tmp_path, name, size, value):
    h, w = size
    image_path, label_path = tmp_path / f"{name}.jpg", tmp_path / f"{name}.png"
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(image_path)
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2:] = value
    Image.fromarray(label, mode="L").save(label_path)
    return image_path, label_path


def test_train_and_val_datasets(tmp_path):
    pairs = [_write_pair(tmp_path, "a", (30, 40), 3), _write_pair(tmp_path, "b", (50, 20), 7)]
    cfg = seg_voc12aug_fcn.Config(crop_size=(32, 32), train_scale=(40, 30))
    dataset = SegTrainDataset(pairs, cfg)
    image, label = dataset[(0, 123)]
    again_image, again_label = dataset[(0, 123)]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.int64
    assert torch.equal(image, again_image) and torch.equal(label, again_label)   # a function of the seed
    assert set(label.unique().tolist()) <= {0, 3, 255}
    val = SegValDataset(pairs, (40, 30))
    image, label = val[1]
    assert label.shape == (50, 20) and image.shape == (3, 40, 16)     # rescaled image, original label


def test_mismatched_label_size_is_input_error(tmp_path):
    from densebench.errors import InputError

    image_path, _ = _write_pair(tmp_path, "a", (30, 40), 3)
    _, label_path = _write_pair(tmp_path, "b", (31, 40), 3)
    with pytest.raises(InputError, match="b.png"):
        SegValDataset([(image_path, label_path)], (40, 30))[0]


def test_train_sampler_is_seeded_resumable_and_sharded():
    full = list(TrainBatchSampler(10, 3, 0, 1, seed=5, start_iteration=0, total_iterations=8))
    assert len(full) == 8 and all(len(b) == 3 for b in full)
    first_epoch = [i for b in full for i, _ in b][:10]
    assert sorted(first_epoch) == list(range(10))
    resumed = list(TrainBatchSampler(10, 3, 0, 1, seed=5, start_iteration=5, total_iterations=8))
    assert resumed == full[5:]
    assert full != list(TrainBatchSampler(10, 3, 0, 1, seed=6, start_iteration=0, total_iterations=8))
    ranks = [list(TrainBatchSampler(10, 1, r, 2, seed=5, start_iteration=0, total_iterations=5)) for r in range(2)]
    indices = [[b[0][0] for b in batches] for batches in ranks]
    assert sorted(indices[0] + indices[1]) == list(range(10))    # one epoch split over two ranks
    seeds = {s for batches in ranks for b in batches for _, s in b}
    assert len(seeds) == 10                                       # every draw gets its own seed


def test_load_pair_converts_cityscapes_label_ids_to_train_ids(synth_root, tmp_path):
    """Without labelTrainIds files the pair points at labelIds, which must come out as train ids."""
    import shutil

    from densebench.data.cityscapes import read_cityscapes
    from densebench.protocols.segmentation import load_pair

    image, train_ids_png = read_cityscapes(synth_root / "cityscapes", "val")[0]
    _, expected = load_pair(image, train_ids_png)
    copy = tmp_path / "cityscapes"
    shutil.copytree(synth_root / "cityscapes", copy)
    for path in copy.rglob("*_gtFine_labelTrainIds.png"):
        path.unlink()
    image_copy, label_ids_png = read_cityscapes(copy, "val")[0]
    assert label_ids_png.name.endswith("_gtFine_labelIds.png")
    _, converted = load_pair(image_copy, label_ids_png)
    assert converted.max() == 255 or converted.max() <= 18
    assert (converted == expected).all()
