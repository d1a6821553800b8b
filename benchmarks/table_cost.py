"""What the whole DenseCL table costs: a short timed run of every protocol, projected to its paper schedule.

For each protocol this runs the protocol's own code (its Config at the paper preset, its data
set classes, loaders, training loop and inference) for a few steps on synthetic data written at
the real image sizes, on one device, and prints
  * seconds per training step and images/s, the fraction of the step the device sat waiting
    for the loader, peak GPU memory;
  * the projected wall time of the full paper schedule on 1 GPU and on 8, and its GPU-hours;
  * the reference figures (8 V100s, issue 20) beside ours with their ratio, and a total.

How it is measured.
  * Every DataLoader iterator created while a protocol runs is timed (`LoaderClock`): on CUDA a
    CUDA event is recorded when the loop asks for the next batch and another when it gets it;
    the time between them on the GPU's clock is the time the GPU had nothing queued, i.e. the
    data wait, and the interval between successive "got" events is the step time. No
    synchronisation is added to the loops. On CPU both are wall-clock times.
  * The iterator with the most steps is the training loop; the first `warmup` steps (worker
    start, cuDNN autotuning, the loader's prefetch buffer) are dropped. Other iterators are
    inference (detection/segmentation evaluation, probe validation, feature extraction).
  * Probes run `linear_probe.prepare_probe` + `train_epoch` + `evaluate`; detection and
    segmentation run the protocol's `run()` on the synthetic layouts (`densebench.data.synth`
    at VOC/COCO/Cityscapes sizes) with a short schedule; SVM and kNN time the protocol's feature
    extractor on JPEGs of VOC/ImageNet size and the protocol's solvers on synthetic features of
    full size; pre-training runs `pretrain.trainer.train` for a few steps and reads its log.
  * Projection: train steps of the paper schedule x measured s/step (scaled by paper/measured
    batch where --quick shrinks the batch) + evaluated images / measured images/s + solver time.
    One process on one GPU with the protocol's default per-process batch (probes 256, detection
    2 images with the schedule scaled linearly, FCN 16 and 8); 8 GPUs = the same work / 8
    (ideal scaling: gradient all-reduce and SyncBN not measured), so GPU-hours are the same.

`--decode both` (default on CUDA) also runs the probes whose transform the device path supports
with `decode=device` (data/gpu_decode.py) and reports them as extra rows: before/after in one run.

    python benchmarks/table_cost.py                         # CUDA: every protocol, ~5 min on an H200
    python benchmarks/table_cost.py --device cpu --quick    # tiny CPU run that exercises everything
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densebench.config import make_config  # noqa: E402
from densebench.evaluate.context import RunContext  # noqa: E402
from densebench.evaluate.random_init import random_init_state_dict  # noqa: E402
from densebench.evaluate.runner import default_workers, protocol_module  # noqa: E402

# ----------------------------------------------------------------------------- facts

# Images per split of the real data sets (official counts).
SIZES = {
    "imagenet_train": 1_281_167, "imagenet_val": 50_000,
    "places205_train": 2_448_873, "places205_val": 20_500,
    "inat18_train": 437_513, "inat18_val": 24_426,
    "voc07_trainval": 5_011, "voc07_test": 4_952,
    "voc0712_det_train": 16_551,            # VOC07 + VOC12 trainval with objects (mmdet filter_empty_gt)
    "coco_train": 117_266, "coco_val": 5_000,   # train2017 images with annotations (of 118,287)
    "voc12aug_train": 10_582, "voc12_val": 1_449,
    "cityscapes_train": 2_975, "cityscapes_val": 500,
}

# Reference cost on 8 V100s (issue 20, from the reference logs and model zoos): GPU-hours
# (low, high) and seconds per iteration of the reference's global batch, where known.
REFERENCE = {
    "linear_imagenet": {"gpu_h": (176.0, 176.0), "s_per_iter": (0.155, 0.175), "iter_images": 256},
    "linear_imagenet_mhead": {"gpu_h": (80.0, 80.0)},
    "det_voc0712_c4": {"gpu_h": (28.6, 28.6), "s_per_iter": (0.537, 0.537), "iter_images": 16},
    "det_coco_maskrcnn_fpn": {"gpu_h": (52.0, 74.4), "s_per_iter": (0.26, 0.37), "iter_images": 16},
}
REFERENCE_TABLE_GPU_H = 500.0          # "roughly 500 V100 GPU-hours" for the whole table

PROBES = {"linear_imagenet": ("imagenet", "avgpool"), "linear_imagenet_mhead": ("imagenet", "multi"),
          "linear_places205_mhead": ("places205", "multi"), "linear_inat18_mhead": ("inat18", "multi")}
# JPEG sizes (min, max side) of the synthetic stand-ins: ImageNet/iNat photos, Places 256x256
JPEG_SIDES = {"imagenet": (256, 500), "places205": (256, 256), "inat18": (600, 800), "voc": (375, 500)}
ALL = ("svm_voc07", "lowshot_svm_voc07", "knn_imagenet", "linear_imagenet_mhead", "linear_imagenet",
       "linear_places205_mhead", "linear_inat18_mhead", "det_voc0712_c4", "det_coco_maskrcnn_fpn",
       "seg_voc12aug_fcn", "seg_cityscapes_fcn")


# ----------------------------------------------------------------------------- schedules

def eval_count(epochs: int, interval: int) -> int:
    """Evaluations of a probe: every `interval` epochs and after the last."""
    return sum(1 for e in range(1, epochs + 1) if e % interval == 0 or e == epochs)


def schedule(name: str) -> Dict[str, Any]:
    """The paper schedule of one protocol on one process: training steps, images per step,
    evaluated (or feature-extracted) images, from the protocol's Config defaults and SIZES."""
    if name == "pretrain":
        from densebench.pretrain.trainer import PretrainConfig
        pcfg = PretrainConfig()
        return {"train_steps": pcfg.epochs * (SIZES["imagenet_train"] // pcfg.batch_size),
                "step_images": pcfg.batch_size, "eval_images": 0}
    cfg = protocol_module(name).Config()
    if name in PROBES:
        dataset = PROBES[name][0]
        n_train, n_val = SIZES[f"{dataset}_train"], SIZES[f"{dataset}_val"]
        return {"train_steps": cfg.epochs * math.ceil(n_train / cfg.batch_size), "step_images": cfg.batch_size,
                "eval_images": eval_count(cfg.epochs, cfg.eval_interval) * n_val}
    if name == "knn_imagenet":
        return {"train_steps": 0, "step_images": 0, "eval_images": SIZES["imagenet_train"] + SIZES["imagenet_val"]}
    if name == "svm_voc07":
        return {"train_steps": 0, "step_images": 0, "eval_images": SIZES["voc07_trainval"] + SIZES["voc07_test"],
                "solver_runs": len(cfg.layers)}
    if name == "lowshot_svm_voc07":        # its features come from svm_voc07's cache
        return {"train_steps": 0, "step_images": 0, "eval_images": 0, "solver_runs": len(cfg.layers)}
    if name == "det_voc0712_c4":        # the reference total batch of 16 at any GPU count (images_per_gpu 0);
        # the timed run uses 2 images per process, the per-GPU batch of the 8-GPU reference
        evals = cfg.max_iter // cfg.eval_interval if cfg.eval_interval else 1
        return {"train_steps": cfg.max_iter, "step_images": cfg.images_per_step,
                "eval_images": evals * SIZES["voc07_test"]}
    if name == "det_coco_maskrcnn_fpn":  # one aspect group: mmdet's per-group padding adds <= 1 step per group and epoch
        from densebench.protocols.det_coco_maskrcnn_fpn import train_schedule
        sched = train_schedule(cfg, [0] * SIZES["coco_train"], cfg.images_per_step)
        return {"train_steps": sched.max_iter, "step_images": cfg.images_per_step,
                "eval_images": cfg.epochs * SIZES["coco_val"]}
    if name.startswith("seg_"):
        n_val = SIZES["voc12_val" if "voc12" in name else "cityscapes_val"]
        return {"train_steps": cfg.iterations, "step_images": cfg.batch_size,
                "eval_images": (cfg.iterations // cfg.eval_interval) * n_val}
    raise ValueError(name)


def project(measured: Dict[str, Any], sched: Dict[str, Any]) -> Dict[str, float]:
    """Seconds of the paper schedule on one GPU from the measured rates (see the module docstring)."""
    train_s = 0.0
    if sched["train_steps"]:
        train = measured["train"]
        train_s = sched["train_steps"] * train["step_s"] * sched["step_images"] / train["batch"]
    eval_s = sched["eval_images"] / measured["eval_img_s"] if sched["eval_images"] else 0.0
    solver_s = measured.get("solver_s", 0.0) * sched.get("solver_runs", 1)
    total = train_s + eval_s + solver_s
    return {"train_s": train_s, "eval_s": eval_s, "solver_s": solver_s, "wall_1gpu_h": total / 3600,
            "wall_8gpu_h": total / 3600 / 8, "gpu_h": total / 3600}


# ----------------------------------------------------------------------------- timing

class LoaderClock:
    """Times every DataLoader iterator created inside the `with` block (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.series: List[Dict[str, Any]] = []

    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self):
        self._original = DataLoader.__iter__
        clock = self

        def timed_iter(loader):
            inner = clock._original(loader)
            record = {"batch": None if loader.batch_sampler is not None else 1, "asked": [], "got": []}
            clock.series.append(record)

            class Timed:
                def __iter__(self):
                    return self

                def __next__(self):
                    record["asked"].append(clock._stamp())      # also at the end: closes the last step
                    item = next(inner)
                    record["got"].append(clock._stamp())
                    if record["batch"] is None:
                        record["batch"] = batch_length(item)
                    return item

                def __len__(self):
                    return len(inner)
            return Timed()

        DataLoader.__iter__ = timed_iter
        return self

    def __exit__(self, *exc):
        DataLoader.__iter__ = self._original
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.device.type == "cuda" else b - a

    def summary(self, record: Dict[str, Any], warmup: int) -> Optional[Dict[str, float]]:
        """Mean step seconds and data-wait fraction over the batches after the first `warmup`.

        Batch i's step runs from asking for it to asking for batch i + 1 (its wait for the
        loader, then the loop's work on it); a batch whose next ask never came (the loop
        stopped) is not counted. None when no batch is left to time."""
        got, asked = record["got"], record["asked"]
        complete = len(asked) - 1
        if complete - warmup < 1:
            return None
        span = self._seconds(asked[warmup], asked[complete])
        wait = sum(self._seconds(asked[i], got[i]) for i in range(warmup, complete))
        return {"step_s": span / (complete - warmup), "data_wait": wait / span if span > 0 else 0.0,
                "steps_timed": complete - warmup, "batch": record["batch"]}

    def train_and_eval(self, warmup: int, eval_warmup: int = 1) -> Dict[str, Any]:
        """The longest series is training; the others are inference (images/s over all of them)."""
        if not self.series:
            raise RuntimeError("no DataLoader was iterated")
        train = max(self.series, key=lambda r: len(r["got"]))
        out: Dict[str, Any] = {"train": self.summary(train, warmup)}
        images, seconds = 0, 0.0
        for record in self.series:
            if record is train:
                continue
            timed = self.summary(record, min(eval_warmup, max(len(record["asked"]) - 2, 0)))
            if timed:
                images += timed["steps_timed"] * record["batch"]
                seconds += timed["steps_timed"] * timed["step_s"]
        out["eval_img_s"] = images / seconds if seconds > 0 else None
        return out


def batch_length(item) -> int:
    """Images in a loader's batch: (tensor N x ..., ...), (tuple of N images, ...) or (EncodedBatch, ...)."""
    first = item[0] if isinstance(item, (tuple, list)) else item
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)


def peak_memory_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- synthetic data

def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """RGB uint8 image with a 1/f amplitude spectrum per channel: at JPEG quality 90 about 5 bits
    per pixel (~100 KB at ImageNet's typical 400x350), like photos, so decoding costs what it does
    on real data (flat synthetic scenes decode faster)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    channels = []
    for _ in range(3):
        x = np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(height, width))
        channels.append((x - x.mean()) / (x.std() + 1e-9))
    mix = np.eye(3) + 0.5 * rng.normal(size=(3, 3))
    return np.clip(np.tensordot(np.stack(channels, -1), mix, axes=([2], [1])) * 40 + 120, 0, 255).astype(np.uint8)


def write_jpegs(folder: Path, count: int, sides, seed: int) -> List[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(natural_image(rng, height, width)).save(path, quality=90)
        paths.append(path)
    return paths


def write_layouts(root: Path, quick: bool) -> Path:
    """VOC07/VOC12/COCO/Cityscapes layouts from densebench's synthetic generator at the real image
    sizes (VOC/COCO 500x375, Cityscapes 2048x1024 PNG), few images each (run in a side process)."""
    from densebench.data import synth

    spec = dataclasses.replace(
        synth.SCALES["tiny"], voc_size=(160, 120) if quick else (500, 375), voc07_trainval=8, voc07_test=4,
        voc12_seg_train=6, voc12_seg_val=3, voc12_seg_aug=6, coco_train=8, coco_val=3,
        cityscapes_size=(256, 128) if quick else (2048, 1024), cityscapes_train_per_city=2,
        cityscapes_train_cities=("aachen",), cityscapes_val=2)
    for _, writer, where in synth.WRITERS[3:]:
        writer(where(root), spec, 0)
    return root


# ----------------------------------------------------------------------------- measurements

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.arch = "resnet18" if self.quick else "resnet50"
        self.root = Path(tempfile.mkdtemp(prefix="table_cost_"))
        self.ckpt = self.root / f"{self.arch}.pth"
        torch.save(random_init_state_dict(self.arch, 0), self.ckpt)
        self.workers = args.workers if args.workers is not None else default_workers(self.device)
        self.warmup, self.steps = args.warmup, args.steps
        self.jpegs: Dict[str, List[Path]] = {}

    def context(self, name: str, data_root: Optional[Path] = None) -> RunContext:
        work = self.root / "work" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return RunContext(self.ckpt, data_root or self.root, work, self.root / "cache" / name, seed=0,
                          device=self.device, arch=self.arch, num_workers=self.workers, show_progress=False)

    def images(self, kind: str) -> List[Path]:
        if kind not in self.jpegs:
            sides = (48, 96) if self.quick else JPEG_SIDES[kind]
            self.jpegs[kind] = write_jpegs(self.root / "jpeg" / kind, 8 if self.quick else 128, sides, seed=len(self.jpegs))
        return self.jpegs[kind]

    def quick_overrides(self, name: str) -> Dict[str, Any]:
        """--quick: the tiny preset of the protocol (small images, small batch) and a short schedule."""
        from densebench.config import load_preset

        return dict(load_preset("tiny").get(name) or {}) if self.quick else {}

    # -- probes
    def probe(self, name: str, decode: str = "cpu") -> Dict[str, Any]:
        from densebench.protocols import linear_probe as lp

        module = protocol_module(name)
        dataset, head = PROBES[name]
        overrides = self.quick_overrides(name)
        if decode != "cpu":
            overrides["decode"] = decode
        if self.quick:
            overrides.update(batch_size=4, num_classes=10)
        cfg, _ = make_config(module.Config, name, "paper", overrides)
        files = self.images(dataset)
        batch = cfg.batch_size
        train = [(files[i % len(files)], i % cfg.num_classes) for i in range((self.warmup + self.steps + 2) * batch)]
        val = [(files[i % len(files)], i % cfg.num_classes) for i in range((2 if self.quick else 4) * batch)]
        ctx = self.context(f"{name}_{decode}")
        reset_peak(self.device)
        with LoaderClock(self.device) as clock:
            probe = lp.prepare_probe(ctx, cfg, head, train, val, module.train_transform(cfg))
            lp.train_epoch(probe.backbone, probe.trained, probe.train_loader, probe.optimizer, probe.runtime, 0,
                           max_steps=self.warmup + self.steps + 1)
            lp.evaluate(probe.backbone, probe.heads, probe.val_loader, probe.runtime, cfg.num_classes)
        out = clock.train_and_eval(self.warmup)
        out["train"]["peak_gb"] = peak_memory_gb(self.device)
        return out

    # -- feature protocols
    def extraction(self, layers, preprocess, kind: str) -> float:
        """Images/s of the protocols' feature extractor (evaluate/features.compute_features)."""
        from densebench.evaluate.checkpoint import build_backbone
        from densebench.evaluate.features import compute_features

        model, _ = build_backbone(self.ckpt, self.arch)
        files = self.images(kind)
        batch = 8 if self.quick else 256
        paths = [files[i % len(files)] for i in range((self.warmup + self.steps + 1) * batch)]
        with LoaderClock(self.device) as clock:
            compute_features(model, paths, layers, preprocess, self.device, batch, self.workers, show_progress=False)
        timed = clock.summary(clock.series[0], self.warmup)
        return timed["steps_timed"] * batch / (timed["steps_timed"] * timed["step_s"])

    def svm_features(self):
        from densebench.protocols.voc_svm_common import synthetic_voc_features

        n_train, n_test = (SIZES["voc07_trainval"], SIZES["voc07_test"]) if not self.quick else (120, 60)
        return synthetic_voc_features(n_train, n_test, 64 if self.quick else 8192, seed=0, signal=0.06)

    def svm_voc07(self) -> Dict[str, Any]:
        from densebench.evaluate.features import voc_preprocess
        from densebench.protocols import svm_voc07
        from densebench.protocols.voc_svm_common import full_svm_sweep

        cfg, _ = make_config(svm_voc07.Config, "svm_voc07", "paper", self.quick_overrides("svm_voc07"))
        img_s = self.extraction(cfg.layers, voc_preprocess(cfg.resize_short, cfg.image_size, cfg.amp), "voc")
        train_x, train_t, test_x, test_t = self.svm_features()
        options = svm_voc07.solver_options(self.context("svm_voc07"), cfg)
        tic = time.perf_counter()
        full_svm_sweep(train_x, train_t, test_x, test_t, costs=cfg.costs, num_folds=cfg.cv_folds, options=options)
        return {"eval_img_s": img_s, "solver_s": time.perf_counter() - tic}

    def lowshot_svm_voc07(self) -> Dict[str, Any]:
        from densebench.protocols import lowshot_svm_voc07 as lowshot
        from densebench.protocols.svm_solver import l2_normalize

        cfg, _ = make_config(lowshot.Config, "lowshot_svm_voc07", "paper", self.quick_overrides("lowshot_svm_voc07"))
        train_x, train_t, test_x, test_t = self.svm_features()
        ctx = self.context("lowshot_svm_voc07")
        options = lowshot.solver_options(ctx, cfg)
        tic = time.perf_counter()
        lowshot.run_layer(ctx, cfg, cfg.layers[0], l2_normalize(train_x), train_t, l2_normalize(test_x), test_t, options)
        return {"eval_img_s": None, "solver_s": time.perf_counter() - tic}

    def knn_imagenet(self) -> Dict[str, Any]:
        from densebench.evaluate.features import GAP, knn_preprocess
        from densebench.protocols import knn_imagenet as knn

        cfg, _ = make_config(knn.Config, "knn_imagenet", "paper", self.quick_overrides("knn_imagenet"))
        img_s = self.extraction([GAP], knn_preprocess(cfg.resize_short, cfg.image_size, cfg.amp), "imagenet")
        bank_rows, queries, dim = (2000, 100, 64) if self.quick else (SIZES["imagenet_train"], 5000, 2048)
        generator = torch.Generator(device=self.device).manual_seed(0)
        bank = torch.randn(bank_rows, dim, device=self.device, generator=generator)
        labels = torch.randint(0, 1000, (bank_rows,), device=self.device, generator=generator)
        query = torch.randn(queries, dim, device=self.device, generator=generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tic = time.perf_counter()
        knn.knn_predict(bank, labels, query, cfg.ks, 1000, cfg.temperature, cfg.query_chunk, cfg.bank_chunk,
                        cfg.backend, self.device)
        seconds = time.perf_counter() - tic
        del bank
        return {"eval_img_s": img_s, "solver_s": seconds * SIZES["imagenet_val"] / queries}

    # -- detection and segmentation: the protocol's run() on synthetic layouts
    def transfer(self, name: str) -> Dict[str, Any]:
        module = protocol_module(name)
        iters = self.warmup + self.steps + 1
        overrides = self.quick_overrides(name)
        if name == "det_voc0712_c4":
            overrides.update(max_iter=iters, images_per_step=2, lr_steps=[], warmup_iters=1, eval_interval=10**6, checkpoint_interval=10**6,
                             max_test_images=2 if self.quick else 6, precise_bn_iters=0)
        elif name == "det_coco_maskrcnn_fpn":
            overrides.update(max_iter=iters, images_per_step=2, warmup_iters=1, eval_interval=10**6,
                             checkpoint_interval=10**6, max_val_images=3)
        else:
            overrides.update(iterations=iters, eval_interval=10**6, checkpoint_interval=10**6)
            if self.quick:
                overrides.update(batch_size=2)
        cfg, _ = make_config(module.Config, name, "paper", overrides)
        ctx = self.context(name, self.layout_root())
        reset_peak(self.device)
        with LoaderClock(self.device) as clock:
            module.run(ctx, cfg)
        out = clock.train_and_eval(self.warmup)
        out["train"]["peak_gb"] = peak_memory_gb(self.device)
        return out

    def layout_root(self) -> Path:
        if getattr(self, "_layouts", None) is not None:
            self._layout_path = self._layouts.result()
            self._layouts = None
        return self._layout_path

    def start_layouts(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1)
        self._layouts = self._pool.submit(write_layouts, self.root / "layouts", self.quick)

    # -- pre-training (not part of the evaluation table)
    def pretrain(self) -> Dict[str, Any]:
        from densebench.pretrain.trainer import PretrainConfig, read_log, train

        overrides = self.quick_overrides("pretrain")
        if self.quick:
            overrides.update(batch_size=4, queue_len=16, bn_group_size=0)
        overrides.update(workers=self.workers)
        cfg, _ = make_config(PretrainConfig, "pretrain", "paper", overrides)
        files = self.images("imagenet")
        # the trainer's loader prefetches 4 batches per worker: drop at least that many steps
        warmup = self.warmup if self.quick else max(self.warmup, 4 * cfg.workers + 2)
        steps = warmup + self.steps
        paths = [files[i % len(files)] for i in range((steps + 1) * cfg.batch_size)]
        work = self.root / "work" / "pretrain"
        shutil.rmtree(work, ignore_errors=True)
        reset_peak(self.device)
        train(cfg, paths, work, device=self.device, stop_after_iters=steps, show_progress=False)
        records = read_log(work / "log.jsonl")[warmup:]
        step_s = statistics.mean(cfg.batch_size / r["pairs_per_s"] for r in records)
        wait = statistics.mean(r["data_wait_frac"] for r in records)
        return {"train": {"step_s": step_s, "data_wait": wait, "steps_timed": len(records), "batch": cfg.batch_size,
                          "peak_gb": peak_memory_gb(self.device)}, "eval_img_s": None}

    # -- CPU-side pipeline and decoder agreement
    def cpu_pipeline(self) -> Dict[str, Any]:
        """Images/s on one core of this process (median of 3 passes over the ImageNet-size JPEGs):
        the linear-probe train transform (PIL decode + RandomResizedCrop + flip + ToTensor +
        Normalize), the validation transform (resize 256, centre crop 224), and what a loader
        worker does with decode=device (read the bytes, parse the header, draw the crop/flip);
        on CUDA also the nvjpeg-vs-PIL pixel difference of the train transform, in 8-bit levels."""
        from densebench.data import gpu_decode
        from densebench.protocols import linear_imagenet
        from densebench.protocols import linear_probe as lp

        cfg = linear_imagenet.Config()
        files = self.images("imagenet")
        transform = linear_imagenet.train_transform(cfg)
        items = [(p, 0) for p in files]
        dataset = lp.LabelledImages(items, transform)
        paths = {"pil_train": dataset, "pil_val": lp.LabelledImages(items, lp.test_transform(256, 224)),
                 "device_path_worker": gpu_decode.EncodedImages(items, transform)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        out: Dict[str, Any] = {"images": len(files), "repeats": 3}
        for what, data in paths.items():
            rates, walls = [], []
            for _ in range(3):       # CPU seconds of this process: a per-core rate even on a shared machine
                tic, wall = time.process_time(), time.perf_counter()
                for i in range(len(data)):
                    data[i]
                rates.append(len(data) / (time.process_time() - tic))
                walls.append(len(data) / (time.perf_counter() - wall))
            out[f"{what}_img_s_per_core"] = statistics.median(rates)
            out[f"{what}_img_s_all"] = [round(r, 1) for r in rates]
            out[f"{what}_img_s_wall"] = [round(r, 1) for r in walls]
        torch.set_num_threads(threads)
        out["pil_img_s_per_core"] = out["pil_train_img_s_per_core"]
        if self.device.type == "cuda":
            device_set = gpu_decode.EncodedImages([(p, 0) for p in files], transform)
            levels = []
            for i in range(len(files)):
                got = gpu_decode.collate_encoded([device_set[i]])[0].to(self.device)[0].cpu()
                levels.append(((got - dataset[i][0]) * torch.tensor(lp.IMAGENET_STD).view(3, 1, 1) * 255).abs())
            levels = torch.stack(levels)
            out["nvjpeg_vs_pil_levels"] = {"max": float(levels.max()), "mean": float(levels.mean()),
                                           "p99": float(torch.quantile(levels.flatten()[:10**7], 0.99))}
        return out


# ----------------------------------------------------------------------------- report

def fmt(value, spec=".2f", empty="-") -> str:
    return empty if value is None else format(value, spec)


def reference_cells(name: str, measured: Dict[str, Any], projection: Dict[str, float]) -> List[str]:
    ref = REFERENCE.get(name.split(" ")[0])
    if ref is None:
        return ["-", "-", "-"]
    ours_iter = "-"
    if "s_per_iter" in ref and measured.get("train"):
        train = measured["train"]
        ours_iter = fmt(train["step_s"] * ref["iter_images"] / train["batch"], ".3f")
        ours_iter += f" vs {ref['s_per_iter'][0]}-{ref['s_per_iter'][1]}"
    low, high = ref["gpu_h"]
    ratio = f"{low / projection['gpu_h']:.1f}x" if low == high else \
        f"{low / projection['gpu_h']:.1f}-{high / projection['gpu_h']:.1f}x"
    return [ours_iter, f"{low:g}" if low == high else f"{low:g}-{high:g}", ratio]


def report(results: Dict[str, Dict[str, Any]], device_name: str, workers: int) -> Dict[str, Any]:
    header = ["protocol", "s/step", "img/s", "batch", "wait", "peak GB", "eval img/s", "solver s", "1 GPU h",
              "8 GPU h", "GPU-h", "s/ref-iter (ours vs V100x8)", "ref GPU-h", "ref/ours"]
    rows, totals = [], {"default": 0.0, "device_decode": 0.0}
    best: Dict[str, float] = {}
    for name, res in results.items():
        measured, proj = res["measured"], res["projection"]
        train = measured.get("train") or {}
        img_s = train["batch"] / train["step_s"] if train else None
        rows.append([name, fmt(train.get("step_s"), ".4f"), fmt(img_s, ".0f"), fmt(train.get("batch"), "d"),
                     fmt(train.get("data_wait") and 100 * train["data_wait"], ".0f") + ("%" if train else ""),
                     fmt(train.get("peak_gb"), ".1f"), fmt(measured.get("eval_img_s"), ".0f"),
                     fmt(measured.get("solver_s"), ".2f"), fmt(proj["wall_1gpu_h"], ".2f"),
                     fmt(proj["wall_8gpu_h"], ".2f"), fmt(proj["gpu_h"], ".2f"),
                     *reference_cells(name, measured, proj)])
        base = name.split(" ")[0]
        if base in ALL:
            if " " not in name:
                totals["default"] += proj["gpu_h"]
            best[base] = min(best.get(base, float("inf")), proj["gpu_h"])
    totals["device_decode"] = sum(best.values())
    print(f"\n{device_name}, {workers} loader workers per process; projections: one process per GPU, "
          "paper schedules, 8 GPUs = ideal scaling")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    table = [n for n in results if n in ALL]
    print(f"\nwhole table ({len(table)} of {len(ALL)} protocols): {totals['default']:.1f} GPU-hours with the "
          f"default decode; {totals['device_decode']:.1f} with decode=device where it is faster; "
          f"reference ~{REFERENCE_TABLE_GPU_H:g} V100 GPU-hours ({REFERENCE_TABLE_GPU_H / totals['default']:.1f}x, "
          f"{REFERENCE_TABLE_GPU_H / max(totals['device_decode'], 1e-12):.1f}x)")
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and ResNet-18: checks the machinery on CPU")
    parser.add_argument("--protocols", default="all",
                        help="comma list of protocols (and 'pretrain'), all, or none (only the CPU pipeline)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the runner's)")
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped (default 12 on CUDA, 1 quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 2 quick)")
    parser.add_argument("--decode", choices=("cpu", "device", "both"), default=None,
                        help="probe decode paths to time (default: both on CUDA, cpu otherwise)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("table_cost: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    # on CUDA the dropped steps outlast the loader's prefetch buffer (2 batches per worker)
    workers = args.workers if args.workers is not None else default_workers(torch.device(args.device))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else max(12, 2 * workers + 2))
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    decode = args.decode or ("both" if args.device.startswith("cuda") else "cpu")
    wanted = list(ALL) + ["pretrain"] if args.protocols == "all" else \
        [] if args.protocols == "none" else [p.strip() for p in args.protocols.split(",")]
    unknown = [p for p in wanted if p not in ALL and p != "pretrain"]
    if unknown:
        print(f"table_cost: unknown protocol(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    from densebench.data.gpu_decode import EncodedImages

    bench = Bench(args)
    if any(p.startswith(("det_", "seg_")) for p in wanted):
        bench.start_layouts()
    device_name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"
    results: Dict[str, Dict[str, Any]] = {}
    failures: Dict[str, str] = {}
    # probes first (the expected bottleneck), then kNN/SVM, detection/segmentation (their layouts
    # are written meanwhile in a side process), pre-training last (not part of the table)
    first = [p for p in ALL if p in PROBES] + [p for p in ALL if p not in PROBES]
    order = [p for p in first + ["pretrain"] if p in wanted]
    try:
        for name in order:
            tic = time.perf_counter()
            runs = [(name, "cpu")]
            if name in PROBES and decode in ("device", "both"):
                module = protocol_module(name)
                supported = hasattr(module.Config(), "decode") and EncodedImages(
                    [], module.train_transform(module.Config())).device_path
                runs = ([(name, "cpu")] if decode == "both" else []) + ([(f"{name} [decode=device]", "device")]
                                                                          if supported else [])
            for label, path in runs:
                try:
                    if name in PROBES:
                        measured = bench.probe(name, path)
                    elif name.startswith(("det_", "seg_")):
                        measured = bench.transfer(name)
                    else:
                        measured = getattr(bench, name)()
                except Exception as exc:  # noqa: BLE001  (one failing protocol must not lose the others)
                    failures[label] = f"{type(exc).__name__}: {exc}"
                    print(f"{label}: FAILED {failures[label]}", flush=True)
                    continue
                sched = schedule(name)
                results[label] = {"measured": measured, "schedule": sched, "projection": project(measured, sched)}
                print(f"{label}: measured {json.dumps(measured)} ({time.perf_counter() - tic:.0f} s)", flush=True)
                if args.json_out:           # after every protocol: a run stopped by a timeout keeps what it had
                    args.json_out.write_text(json.dumps({"device": device_name, "partial": True, "results": results,
                                                         "failures": failures}, indent=1))
        pipeline = bench.cpu_pipeline()
        print(f"CPU pipeline (linear-probe train transform, one core, this machine): {json.dumps(pipeline)}")
    finally:
        if getattr(bench, "_pool", None) is not None:
            bench._pool.shutdown(cancel_futures=True)
        shutil.rmtree(bench.root, ignore_errors=True)
    totals = report(results, device_name, bench.workers) if results else {}
    for label, res in results.items():
        if label.startswith("linear_") and res["measured"]["train"]:
            train = res["measured"]["train"]
            busy = train["step_s"] * (1 - train["data_wait"])
            need = train["batch"] / busy / pipeline["pil_img_s_per_core"]
            print(f"{label}: the device consumes {train['batch'] / busy:.0f} img/s when fed; PIL at "
                  f"{pipeline['pil_img_s_per_core']:.0f} img/s per core needs ~{need:.0f} cores to keep up")
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": device_name, "workers": bench.workers, "quick": args.quick,
                                             "results": results, "totals": totals, "cpu_pipeline": pipeline,
                                             "failures": failures}, indent=1))
    for label, error in failures.items():
        print(f"FAILED {label}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
