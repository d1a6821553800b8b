"""The probes' `decode: device` path (densebench/data/gpu_decode.py) against the PIL path.

Run on CPU, where the device path decodes with torchvision's libjpeg-turbo: the crop boxes and
flips must be the PIL path's exactly (same draws), and the pixels equal within one 8-bit level
(measured: at most 1 level, mean 0.14-0.18 levels over the 6 images x 2 epochs below,
natural-spectrum JPEGs of benchmarks/table_cost.py, 256-500 px, quality 90; torchvision's and
Pillow's libjpeg-turbo decode identically, the difference is the rounding of the antialiased
resize). nvjpeg on CUDA is measured against PIL by benchmarks/table_cost.py on the GPU machine.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from densebench.config import make_config
from densebench.data import gpu_decode
from densebench.evaluate.backbone import IMAGENET_STD
from densebench.protocols import linear_probe as lp

LEVEL = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0     # one 8-bit level, after Normalize

# the natural-spectrum JPEG writer of the GPU cost benchmark: the test decodes what it measures
_spec = importlib.util.spec_from_file_location(
    "table_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "table_cost.py")
table_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table_cost)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    paths = table_cost.write_jpegs(tmp_path_factory.mktemp("jpegs"), 6, (256, 500), seed=0)
    return [(path, i) for i, path in enumerate(paths)]


TRANSFORMS = {
    "rrc_flip": lp.crop_flip_transform(224, (0.08, 1.0)),          # linear_imagenet, iNat18 train
    "test": lp.test_transform(256, 224),                          # every probe's val
    "places": importlib.import_module("densebench.protocols.linear_places205_mhead").train_transform(
        importlib.import_module("densebench.protocols.linear_places205_mhead").Config()),
}


def device_output(dataset, index):
    return gpu_decode.collate_encoded([dataset[index]])[0].to("cpu")[0]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_device_path_equals_the_pil_path_within_one_level(jpegs, name):
    transform = TRANSFORMS[name]
    pil, device = lp.LabelledImages(jpegs, transform, seed=3), gpu_decode.EncodedImages(jpegs, transform, seed=3)
    assert device.device_path
    levels = []
    for epoch in (0, 1):
        pil.set_epoch(epoch)
        device.set_epoch(epoch)
        for index in range(len(jpegs)):
            assert isinstance(device[index][0], gpu_decode.EncodedImage)
            expected, got = pil[index][0], device_output(device, index)
            assert got.shape == expected.shape
            levels.append(((got - expected) * LEVEL).abs())
    levels = torch.stack(levels)
    assert levels.max() <= 1.01 and levels.mean() < 0.3


def test_crop_boxes_and_flips_are_the_pil_draws(jpegs):
    """The plan holds the box RandomResizedCrop.get_params draws on the PIL image, and the flip."""
    transform = TRANSFORMS["rrc_flip"]
    rrc = transform.transforms[0]
    flips = 0
    for seed in range(20):
        path, _ = jpegs[seed % len(jpegs)]
        image = Image.open(path)
        torch.manual_seed(seed)
        box = rrc.get_params(image, rrc.scale, rrc.ratio)
        flipped = bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        plan = gpu_decode.plan_transform(transform, *image.size)
        assert plan[0] == ("crop", *box) and plan[1] == ("resize", 224, 224)
        assert (("flip",) in plan) == flipped
        flips += flipped
    assert 0 < flips < 20


def test_files_the_device_path_cannot_take_go_through_the_cpu_path(tmp_path, jpegs):
    """Grey and CMYK JPEGs, PNG bytes behind a .JPEG name and EXIF-rotated photos are decoded by
    load_image with the same draws: output identical to the PIL path."""
    rgb = np.asarray(Image.open(jpegs[0][0]))
    grey = tmp_path / "grey.JPEG"
    Image.fromarray(rgb[..., 0]).save(grey, quality=90)
    cmyk = tmp_path / "cmyk.JPEG"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=90)
    png = tmp_path / "png.JPEG"
    Image.fromarray(rgb).save(png, format="PNG")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[gpu_decode.EXIF_ORIENTATION] = 6
    Image.fromarray(rgb).save(rotated, quality=90, exif=exif)
    items = [(grey, 0), (cmyk, 1), (png, 2), (rotated, 3)]
    transform = TRANSFORMS["rrc_flip"]
    pil, device = lp.LabelledImages(items, transform, seed=1), gpu_decode.EncodedImages(items, transform, seed=1)
    for index in range(len(items)):
        item = device[index][0]
        assert isinstance(item, torch.Tensor)
        assert torch.equal(device_output(device, index), pil[index][0])


def test_colour_jitter_is_pillows_arithmetic_exactly():
    """Brightness/contrast/saturation in any order and factor: equal to torchvision's PIL ops."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(1)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for _ in range(10):
        pixels = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        pixels = np.clip(pixels // 2 + np.linspace(0, 120, 80)[None, :, None], 0, 255).astype(np.uint8)
        ops = tuple((int(i), float(rng.uniform(0.6, 1.4))) for i in rng.permutation(3))
        image = Image.fromarray(pixels)
        for op, factor in ops:
            image = adjust[op](image, factor)
        expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
        got = gpu_decode.color_jitter(torch.from_numpy(pixels).permute(2, 0, 1).float(), ops)
        assert torch.equal(got, expected)


def test_mhead_jitter_and_lighting_follow_the_pil_path(jpegs):
    """ImageNet multi-head train transform (RRC, flip, ColorJitter, ToTensor, Lighting, Normalize):
    same draws; the resize's one-level differences are amplified by up to 1.4x per jitter op
    (measured: max 5 levels, mean 0.20, 4 % of values off by more than one level)."""
    mhead = importlib.import_module("densebench.protocols.linear_imagenet_mhead")
    transform = mhead.train_transform(mhead.Config())
    pil, device = lp.LabelledImages(jpegs, transform, seed=3), gpu_decode.EncodedImages(jpegs, transform, seed=3)
    assert device.device_path
    levels = torch.stack([((device_output(device, i) - pil[i][0]) * LEVEL).abs() for i in range(len(jpegs))])
    assert levels.max() <= 6.01 and levels.mean() < 0.3 and (levels > 1.01).float().mean() < 0.08


def test_unknown_transforms_keep_the_whole_set_on_the_cpu_path(jpegs):
    transform = T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.ToTensor()])   # hue
    with pytest.raises(gpu_decode.Unsupported):
        gpu_decode.check_transform(transform)
    device = gpu_decode.EncodedImages(jpegs, transform, seed=0)
    assert not device.device_path
    assert torch.equal(device_output(device, 0), lp.LabelledImages(jpegs, transform, seed=0)[0][0])


def test_decode_option_is_validated_and_recorded(synth_root, resnet18_checkpoint, tmp_path):
    """A tiny CPU probe with decode=device runs through the protocol, records the option, and
    its first training batch equals the PIL path's within one level."""
    from densebench.evaluate.context import RunContext
    from densebench.protocols import linear_imagenet

    cfg, label = make_config(linear_imagenet.Config, linear_imagenet.NAME, "tiny", {"decode": "device", "epochs": 1,
                                                                                      "lr_steps": []})
    assert label == "custom" and linear_imagenet.Config().decode == "cpu"
    ctx = RunContext(resnet18_checkpoint, synth_root, tmp_path / "work", tmp_path / "cache", show_progress=False)
    out = linear_imagenet.run(ctx, cfg)
    assert out.extra["decode"] == "device"
    train, val, _ = lp.load_probe_data("imagenet", synth_root, cfg.num_classes)
    probes = {decode: lp.prepare_probe(ctx, make_config(linear_imagenet.Config, linear_imagenet.NAME, "tiny",
                                                        {"decode": decode})[0], "avgpool", train, val,
                                       linear_imagenet.train_transform(cfg))
              for decode in ("cpu", "device")}
    batches = {decode: next(iter(probe.train_loader)) for decode, probe in probes.items()}
    assert torch.equal(batches["cpu"][2], batches["device"][2])            # same samples
    images = batches["device"][0].to("cpu")
    assert ((images - batches["cpu"][0]) * LEVEL).abs().max() <= 1.01
    cfg.decode = "disk"
    with pytest.raises(Exception, match="decode must be"):
        lp.check_config(cfg, "avgpool")
