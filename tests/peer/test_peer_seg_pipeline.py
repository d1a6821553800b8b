"""FCN training pipeline (VOC12-Aug and Cityscapes) against mmseg 0.30's own transforms.

The same image and label go through mmseg's Resize -> RandomCrop(cat_max_ratio) -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad -> DefaultFormatBundle (the benchmark config's train
pipeline after loading) and through densebench's `train_transform`, with the same random draws
injected on both sides (`Draws`: mmseg's numpy calls are patched, densebench gets the replay as its
Generator). Both must make the same draws in the same order and return the same network input,
padding and label.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from densebench.protocols import segmentation as seg
from seg_reference import BENCHMARKS, Draws

# random draw sequences; the photometric ops are forced on one by one in the test below
SEEDS = [0, 1, 2, 3]


def _scene(height: int, width: int, dominant: bool, seed: int):
    """A smooth colour image with texture (so resizing has to interpolate) and a label map: a
    background, two objects, and ignored (255) border strips. `dominant`: one class covers ~90%,
    so most crops fail cat_max_ratio and the retry loop (and its 10-retry fallback) runs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(xs / 7.0 + c) * np.cos(ys / 5.0 - c) for c in range(3)], axis=-1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    if dominant:
        label[height // 2: height // 2 + 6, width // 3: width // 3 + 6] = 7
    else:
        label[height // 4: 3 * height // 4, width // 5: width // 2] = 3
        label[height // 3:, 2 * width // 3:] = 12
    label[:2, :] = 255
    label[:, -3:] = 255
    return image, label


def _reference(benchmark: str, image_rgb: np.ndarray, label: np.ndarray, draws: Draws, monkeypatch):
    from mmseg.datasets.pipelines import Compose

    draws.patch_numpy(monkeypatch)
    pipeline = Compose(BENCHMARKS[benchmark]["train_pipeline"])
    results = dict(img=np.ascontiguousarray(image_rgb[..., ::-1]),  # mmseg loads BGR (cv2)
                   gt_semantic_seg=label.copy(), seg_fields=["gt_semantic_seg"], filename="x.png",
                   ori_filename="x.png", ori_shape=image_rgb.shape, img_shape=image_rgb.shape)
    out = pipeline(results)
    monkeypatch.undo()
    return out["img"].data, out["gt_semantic_seg"].data[0], out["img_metas"].data


def _run_both(benchmark, size, dominant, seed, monkeypatch, overrides=None):
    image, label = _scene(*size, dominant=dominant, seed=seed)
    draws = Draws(seed, overrides)
    ref_image, ref_label, meta = _reference(benchmark, image, label, draws, monkeypatch)
    replay = draws.replay()
    ours_image, ours_label = seg.train_transform(image, label, BENCHMARKS[benchmark]["densebench"](), replay)
    assert replay.done(), "densebench made fewer draws than mmseg"
    return ref_image, ref_label, ours_image, ours_label, draws, meta


@pytest.mark.parametrize("benchmark,size", [("voc12aug", (75, 100)), ("cityscapes", (48, 96))])
@pytest.mark.parametrize("dominant", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_train_pipeline_matches_mmseg(benchmark, size, dominant, seed, monkeypatch):
    ref_image, ref_label, ours_image, ours_label, draws, meta = _run_both(benchmark, size, dominant, seed, monkeypatch)
    assert ours_image.shape == ref_image.shape == (3, *BENCHMARKS[benchmark]["densebench"]().crop_size)
    assert torch.equal(ours_label, ref_label.long())
    # padding: image 0 and label 255 outside the crop, in both
    crop_h, crop_w = meta["img_shape"][:2]
    assert bool((ours_label[crop_h:] == 255).all()) and bool((ours_label[:, crop_w:] == 255).all())
    assert float(ours_image[:, crop_h:].abs().sum()) == 0.0 and float(ours_image[:, :, crop_w:].abs().sum()) == 0.0
    torch.testing.assert_close(ours_image, ref_image, rtol=0, atol=1e-5)


def test_draws_are_really_exercised(monkeypatch):
    """The cases above cover the retry loop, its 10-retry fallback, flips and every photometric op."""
    retries, fallback = False, False
    for seed in SEEDS:
        *_, draws, _ = _run_both("voc12aug", (75, 100), True, seed, monkeypatch)
        ints_before_flip = [kind for kind, _ in draws.log[1:]].index("float")
        retries |= ints_before_flip > 2
        fallback |= ints_before_flip == 22  # first box + 10 re-draws, 2 offsets each
    assert retries and fallback


# Photometric draws in mmseg's order: brightness on?, delta, mode (1 = contrast first), [contrast
# on?, alpha], saturation on?, alpha, hue on?, delta, [contrast on?, alpha]. 0.99 switches an op on.
ALL_ON_CONTRAST_FIRST = [0.99, 0.8, 0.99, 0.99, 0.9, 0.99, 0.1, 0.99, 0.2]
ALL_ON_CONTRAST_LAST = [0.99, 0.1, 0.0, 0.99, 0.95, 0.99, 0.7, 0.99, 0.3]


@pytest.mark.parametrize("units", [ALL_ON_CONTRAST_FIRST, ALL_ON_CONTRAST_LAST])
@pytest.mark.parametrize("width", [77, 96, 45])  # OpenCV's HSV->RGB runs 32-pixel blocks + a tail
def test_photometric_distortion_matches_mmseg(units, width, monkeypatch):
    from mmseg.datasets.pipelines import PhotoMetricDistortion

    image, _ = _scene(23, width, dominant=False, seed=width)
    draws = Draws(0, overrides=dict(enumerate(units)))
    draws.patch_numpy(monkeypatch)
    ref = PhotoMetricDistortion()(dict(img=np.ascontiguousarray(image[..., ::-1])))["img"][..., ::-1]
    monkeypatch.undo()
    assert len(draws.log) == len(units)
    replay = draws.replay()
    ours = seg.photometric_distortion(image, replay)
    assert replay.done()
    assert not np.array_equal(ours, image)
    np.testing.assert_array_equal(ours, ref)


def test_resize_and_colour_conversions_equal_opencv():
    """The primitives mmcv calls through OpenCV, bit for bit: bilinear and nearest resize over
    random sizes (up and down, odd and even, exact halving), RGB<->HSV over all 8-bit values."""
    import cv2

    rng = np.random.default_rng(0)
    for trial in range(40):
        src_h, src_w = rng.integers(5, 120, 2)
        dst_h, dst_w = [(src_h // 2, src_w // 2), (src_h * 2, src_w * 2)][trial % 2] if trial < 10 else rng.integers(3, 300, 2)
        image = rng.integers(0, 256, (src_h, src_w, 3)).astype(np.uint8)
        label = rng.integers(0, 256, (src_h, src_w)).astype(np.uint8)
        size = (int(dst_h), int(dst_w))
        np.testing.assert_array_equal(seg.resize_image(image, size, rows_per_chunk=7),
                                      cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR))
        np.testing.assert_array_equal(seg.resize_label(label, size),
                                      cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST))
    values = np.arange(256)
    # every (r, g) pair with 24 blue levels (all levels: 16.7M pixels, too slow for CI); rows of 45
    # pixels run one 32-pixel vector block and a 13-pixel scalar tail in OpenCV
    blues = np.concatenate([[0, 1, 254, 255], rng.choice(np.arange(2, 254), 20, replace=False)])
    rgb = np.stack(np.meshgrid(values, values, blues, indexing="ij"), -1).reshape(-1, 3)
    rgb = np.ascontiguousarray(rgb[: len(rgb) // 45 * 45].reshape(-1, 45, 3).astype(np.uint8))
    np.testing.assert_array_equal(seg.rgb_to_hsv_opencv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = rgb.copy()
    hsv[..., 0] %= 180
    np.testing.assert_array_equal(seg.hsv_opencv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def _test_pipeline(img_scale):
    """V / C test_pipeline after LoadImageFromFile (flip=False, single scale)."""
    return [dict(type="MultiScaleFlipAug", img_scale=img_scale, flip=False,
                 transforms=[dict(type="Resize", keep_ratio=True), dict(type="RandomFlip"),
                             dict(type="Normalize", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                                  to_rgb=True),
                             dict(type="ImageToTensor", keys=["img"]), dict(type="Collect", keys=["img"])])]


@pytest.mark.parametrize("benchmark,size", [("voc12aug", (75, 100)), ("voc12aug", (120, 61)),
                                            ("cityscapes", (64, 128)), ("cityscapes", (50, 77))])
def test_test_pipeline_matches_mmseg(benchmark, size):
    from mmseg.datasets.pipelines import Compose

    image, _ = _scene(*size, dominant=False, seed=7)
    test_scale = BENCHMARKS[benchmark]["test_scale"]
    out = Compose(_test_pipeline(test_scale))(dict(img=np.ascontiguousarray(image[..., ::-1]), filename="x.png",
                                                    ori_filename="x.png", ori_shape=image.shape,
                                                    img_shape=image.shape))
    ours = seg.val_transform(image, BENCHMARKS[benchmark]["densebench"]().test_scale)
    torch.testing.assert_close(ours, out["img"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["voc_jpeg_palette", "cityscapes_png_gray"])
def test_image_and_label_decoding_match_mmseg_loaders(kind, tmp_path):
    """mmseg LoadImageFromFile (cv2 decode, BGR) and LoadAnnotations (Pillow, stored indices) vs
    densebench's load_pair, on a VOC-style JPEG (4:2:0 chroma, as VOC's) with a palette PNG label and
    a Cityscapes-style PNG with a grey labelTrainIds PNG."""
    from PIL import Image
    from mmseg.datasets.pipelines import LoadAnnotations, LoadImageFromFile

    image, label = _scene(45, 67, dominant=False, seed=3)
    if kind == "voc_jpeg_palette":
        image_path, label_path = tmp_path / "2008_000001.jpg", tmp_path / "2008_000001.png"
        Image.fromarray(image).save(image_path, quality=90, subsampling=2)
        palette = Image.fromarray(label, mode="P")
        palette.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        palette.save(label_path)
    else:
        image_path = tmp_path / "aachen_000000_000019_leftImg8bit.png"
        label_path = tmp_path / "aachen_000000_000019_gtFine_labelTrainIds.png"
        Image.fromarray(image).save(image_path)
        Image.fromarray(label, mode="L").save(label_path)
    results = dict(img_prefix=None, img_info=dict(filename=str(image_path)), seg_prefix=None,
                   ann_info=dict(seg_map=str(label_path)), seg_fields=[])
    results = LoadAnnotations()(LoadImageFromFile()(results))
    ours_image, ours_label = seg.load_pair(image_path, label_path)
    np.testing.assert_array_equal(ours_image, results["img"][..., ::-1])
    np.testing.assert_array_equal(ours_label, results["gt_semantic_seg"])
