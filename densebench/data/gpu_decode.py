"""JPEG decoding and the probes' crop/flip/normalise on the training device (probe option `decode: device`).

Why: a linear probe at paper scale pushes 90-100 epochs of ImageNet through a frozen backbone
that needs a few milliseconds per batch on a GPU; PIL decoding and augmentation in the loader
workers are then the bottleneck (issue 20). With `decode: device` the workers only read the
file bytes and draw the augmentation parameters; the main process decodes a whole batch with
`torchvision.io.decode_jpeg(list, device=cuda)` (nvjpeg) and applies the same geometry with
tensor ops on the GPU.

Same protocol definition: the GPU path interprets the protocol's own torchvision transform
(`T.Compose` of RandomResizedCrop, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip,
ColorJitter without hue, ToTensor, Lighting, Normalize). For each sample it calls the same
`get_params` / `torch.rand` / `torch.normal` draws in the same order under the same per-sample
seed as `data.labelled.LabelledImages`, so crop boxes, flips, jitter factors and lighting are identical; the
colour jitter reproduces Pillow's ImageEnhance arithmetic exactly (8-bit truncation after each
op). Only the decoder and the antialiased bilinear resize differ from PIL, by at most one 8-bit
level, which the jitter can amplify to a few (bounds in tests/test_gpu_decode.py). Anything else (a transform this module does not know,
a non-RGB or non-JPEG file, an EXIF rotation, a crop that would pad) goes through the CPU path
(`load_image` + the transform) for that sample, with the same draws.

On a CPU device the same code decodes with torchvision's libjpeg-turbo, which is how the test
checks it without a GPU.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from densebench.data.image import load_image
from densebench.data.labelled import LabelledImages, sample_seed

DECODE_OPTIONS = ("cpu", "device")
EXIF_ORIENTATION = 0x0112

# a plan is a list of ("crop", top, left, height, width) | ("resize", height, width) | ("flip",)
# | ("to_float",) | ("normalize", mean, std) steps, applied in order to a uint8 CHW image
Plan = List[Tuple[Any, ...]]


class Unsupported(Exception):
    """This sample (or transform) cannot take the device path; it goes through the CPU path."""


def _shape(height: int, width: int) -> torch.Tensor:
    """An empty CHW tensor of the given size: torchvision's get_params only read its shape."""
    return torch.empty((0, height, width))


def plan_transform(transform: Callable, width: int, height: int) -> Plan:
    """The steps `transform` would apply to a width x height image, drawing its random parameters
    from the global torch RNG exactly as calling `transform(pil_image)` does."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    from densebench.protocols.linear_probe import Lighting

    plan: Plan = []
    h, w = height, width
    for t in steps:
        if isinstance(t, T.RandomResizedCrop):
            if t.interpolation != T.InterpolationMode.BILINEAR:
                raise Unsupported(f"{t} (only bilinear)")
            top, left, ch, cw = t.get_params(_shape(h, w), t.scale, t.ratio)
            h, w = (t.size[0], t.size[1]) if len(t.size) == 2 else (t.size[0], t.size[0])
            plan += [("crop", top, left, ch, cw), ("resize", h, w)]
        elif isinstance(t, T.Resize):
            if t.interpolation != T.InterpolationMode.BILINEAR:
                raise Unsupported(f"{t} (only bilinear)")
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            h, w = TF._compute_resized_output_size((h, w), size, t.max_size)
            plan.append(("resize", h, w))
        elif isinstance(t, T.CenterCrop):
            th, tw = t.size
            if th > h or tw > w:
                raise Unsupported("CenterCrop larger than the image pads")
            plan.append(("crop", int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw))
            h, w = th, tw
        elif isinstance(t, T.RandomCrop):
            if t.padding is not None or t.pad_if_needed:
                raise Unsupported(f"{t} with padding")
            th, tw = t.size
            if th > h or tw > w:
                raise Unsupported("RandomCrop larger than the image")
            top, left, _, _ = t.get_params(_shape(h, w), (th, tw))
            plan.append(("crop", top, left, th, tw))
            h, w = th, tw
        elif isinstance(t, T.RandomHorizontalFlip):
            if torch.rand(1) < t.p:
                plan.append(("flip",))
        elif isinstance(t, T.ColorJitter):
            order, *factors = t.get_params(t.brightness, t.contrast, t.saturation, t.hue)
            if factors[3] is not None:
                raise Unsupported(f"{t} (hue)")
            plan.append(("jitter", tuple((int(i), factors[int(i)]) for i in order if factors[int(i)] is not None)))
        elif isinstance(t, Lighting):
            if t.alphastd != 0:                  # the draw and the shift of Lighting.__call__
                alpha = torch.normal(0.0, t.alphastd, size=(3,))
                plan.append(("add", tuple((t.eigvec * (alpha * t.eigval).view(1, 3)).sum(dim=1).tolist())))
        elif isinstance(t, T.ToTensor):
            plan.append(("to_float",))
        elif isinstance(t, T.Normalize):
            plan.append(("normalize", tuple(t.mean), tuple(t.std)))
        else:
            raise Unsupported(f"transform {t!r}")
    return plan


def check_transform(transform: Callable) -> None:
    """Raise Unsupported when `transform` holds a step the device path cannot replay."""
    with torch.random.fork_rng(devices=[]):
        plan_transform(transform, 512, 512)


_CONSTANTS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(mean, std, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalize's mean and std as (3, 1, 1) float tensors on `device`, made once (not one tiny
    host-to-device copy per image)."""
    key = (tuple(mean), tuple(std), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                for v in (mean, std))
    return _CONSTANTS[key]


def apply_plan(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Run a plan on one uint8 CHW image (any device); returns float CHW.

    Resizes are antialiased bilinear on float values rounded back to 0..255, which is what
    PIL's bilinear resize of an 8-bit image computes up to rounding."""
    x = image
    for step in plan:
        kind = step[0]
        if kind == "crop":
            _, top, left, h, w = step
            x = x[:, top:top + h, left:left + w]
        elif kind == "resize":
            _, h, w = step
            if tuple(x.shape[-2:]) != (h, w):
                resized = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                                        antialias=True)[0]
                x = resized.round_().clamp_(0, 255)
        elif kind == "flip":
            x = x.flip(-1)
        elif kind == "jitter":
            x = color_jitter(x.float(), step[1])
        elif kind == "add":
            x = x + torch.tensor(step[1], dtype=x.dtype).to(x.device, non_blocking=True).view(-1, 1, 1)
        elif kind == "to_float":
            x = x.float().div_(255.0)
        elif kind == "normalize":
            mean_t, std_t = _constants(step[1], step[2], x.device)
            x = (x - mean_t) / std_t
    return x


def pil_luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L of 0..255 values: (R*19595 + G*38470 + B*7471 + 2**15) >> 16."""
    return torch.floor((x[0] * 19595 + x[1] * 38470 + x[2] * 7471 + 32768) / 65536)


def color_jitter(x: torch.Tensor, ops) -> torch.Tensor:
    """torchvision's ColorJitter on a PIL image (ImageEnhance Brightness / Contrast / Color =
    Image.blend with a degenerate image, truncated to 8 bits after each op), on 0..255 floats.
    ops: ((0 brightness | 1 contrast | 2 saturation, factor), ...) in the drawn order."""
    for op, factor in ops:
        if op == 0:
            degenerate = torch.zeros_like(x)
        elif op == 1:
            degenerate = torch.full_like(x, float(torch.floor(pil_luma(x).mean() + 0.5)))
        else:
            degenerate = pil_luma(x).expand_as(x)
        x = torch.floor((degenerate + factor * (x - degenerate)).clamp_(0, 255))
    return x


class EncodedImage:
    """The file bytes of one JPEG and its drawn plan (decoded later, a batch at a time)."""

    __slots__ = ("data", "plan")

    def __init__(self, data: torch.Tensor, plan: Plan):
        self.data = data
        self.plan = plan


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """uint8 RGB CHW images of JPEG byte tensors, decoded on `device` in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; the call
        # is unchanged (and not deprecated) in the versions pyproject allows, 0.19-0.28
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    return list(out)


class EncodedBatch:
    """A batch as the loader hands it over: EncodedImages and already-finished CPU tensors.

    `.to(device)` decodes and augments on that device and returns the stacked float batch, so
    the probe's `Runtime.head_inputs` (which calls `batch.to(device)`) needs no change."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":
        return self           # the bytes go to the decoder from pageable memory

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        encoded = [i for i, item in enumerate(self.items) if isinstance(item, EncodedImage)]
        decoded = decode_jpegs([self.items[i].data for i in encoded], device) if encoded else []
        out: List[Optional[torch.Tensor]] = [None] * len(self.items)
        for i, image in zip(encoded, decoded):
            out[i] = apply_plan(image, self.items[i].plan)
        for i, item in enumerate(self.items):
            if out[i] is None:
                out[i] = item.to(device, non_blocking=non_blocking)
        return torch.stack(out)


def jpeg_header(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) when `data` is a JPEG the device path decodes as PIL would (3-channel
    RGB/YCbCr, no EXIF rotation), else None. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return None
            if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                return None
            return img.size
    except Exception:  # noqa: BLE001  (the CPU path reports unreadable files with their name)
        return None


class EncodedImages(LabelledImages):
    """(path, label) pairs -> (EncodedImage or finished tensor, label, index).

    Same seeding as `LabelledImages`: the draws of sample i in epoch e come from a private
    torch RNG seeded by sample_seed(seed, e, i)."""

    def __init__(self, items: Sequence[Tuple[Path, int]], transform: Callable, seed: int = 0):
        super().__init__(items, transform, seed)
        try:
            check_transform(transform)
            self.device_path = True
        except Unsupported:
            self.device_path = False

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            state = torch.get_rng_state()
            if self.device_path:
                data = Path(path).read_bytes()
                size = jpeg_header(data)
                if size is not None:
                    try:
                        plan = plan_transform(self.transform, *size)
                        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), plan), int(label), index
                    except Unsupported:
                        torch.set_rng_state(state)      # the CPU path draws from the start again
            tensor = self.transform(load_image(path))
        return tensor, int(label), index


def collate_encoded(batch):
    """(EncodedBatch, labels, indices) from (item, label, index) triples."""
    items, labels, indices = zip(*batch)
    return EncodedBatch(items), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)
