"""Is low precision harmless? The same seeds in fp32 and in the defaults' bf16/fp16 autocast, compared.

The reference trained and evaluated in fp32; densebench's CUDA defaults use bf16 autocast for
pre-training and the probes, fp16 autocast for feature extraction, detection and segmentation.
This runs, on one device, each through densebench's own code:
  1. pre-training (`pretrain.trainer.train`, paper config, batch 32 = one reference GPU, queue
     65536): fp32, bf16 and fp32 with another seed (the seed-to-seed noise floor); the loss
     curves are compared over the last fifth of the steps. Images are smaller than 224 px
     (`--pretrain-size`, 128 by default) so that three runs of `--pretrain-steps` fit the
     device session;
  2. the fp32 run's last checkpoint: features feat1..feat5 and GAP of VOC-size JPEGs with fp16
     autocast and in fp32 (`evaluate.features.compute_features`): relative L2 difference, cosine;
  3. `svm_voc07` and `knn_imagenet` on the synthetic VOC07/ImageNet (`densebench.data.synth`,
     'small' sizes) with amp on and off: the metric difference;
  4. a short `linear_imagenet` probe (224 px) and a short `det_voc0712_c4` run, amp on and off:
     top-1 / final losses.
"fp32" means full fp32: TF32 is switched off for cuDNN and matmuls (the V100 reference had none).
Prints a verdict table: each difference against its stated bound.

    python benchmarks/precision_check.py                      # CUDA, about 3 minutes on an H200
    python benchmarks/precision_check.py --device cpu --quick # tiny CPU run of the same steps
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from densebench.config import make_config  # noqa: E402
from densebench.evaluate.context import RunContext  # noqa: E402

# Bounds a low-precision result must stay within to count as harmless (judgement, stated here):
BOUNDS = {
    "pretrain_loss_gap_vs_noise": 1.0,     # bf16-vs-fp32 loss gap at most the fp32 seed-to-seed gap
    "feature_rel_l2": 1e-2,                # per layer, ||amp - fp32|| / ||fp32||
    "svm_map_points": 0.3,                 # VOC07 SVM mAP, percentage points, per layer
    "knn_top1_points": 0.5,                # k = 20 top-1, percentage points
    "probe_top1_points": 1.0,              # linear probe top-1, percentage points
    "det_loss_rel": 0.05,                  # mean loss over the last steps, relative
}


@contextmanager
def strict_fp32():
    """Full fp32 on CUDA: no TF32 in cuDNN convolutions or matmuls, restored afterwards."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Check:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.arch = "resnet18" if self.quick else "resnet50"
        self.root = Path(tempfile.mkdtemp(prefix="precision_check_"))
        self.rows: List[Dict[str, Any]] = []

    def row(self, what: str, fp32, low, diff: float, bound: float, note: str = "") -> None:
        self.rows.append({"what": what, "fp32": fp32, "low": low, "diff": diff, "bound": bound,
                          "ok": bool(diff <= bound), "note": note})
        print(f"  {what}: fp32 {fp32}, low {low}, diff {diff:.4g} (bound {bound:g}) {note}", flush=True)

    def ctx(self, name: str, ckpt: Path, data_root: Path) -> RunContext:
        work = self.root / "work" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return RunContext(ckpt, data_root, work, self.root / "cache" / name, seed=0, device=self.device,
                          arch=self.arch, num_workers=0 if self.quick else 8, show_progress=False)

    # 1. pre-training loss curves
    def pretrain(self, bf16: bool, seed: int, paths) -> List[float]:
        from densebench.pretrain.trainer import PretrainConfig, read_log, train

        steps = self.args.pretrain_steps
        overrides = {"bf16": bf16, "seed": seed, "batch_size": self.args.batch, "image_size": self.args.pretrain_size,
                     "checkpoint_interval": steps, "workers": 0 if self.quick else 8}
        if self.quick:
            overrides.update(arch="resnet18", queue_len=16, bn_group_size=0)
        cfg, _ = make_config(PretrainConfig, "pretrain", "paper", overrides)
        work = self.root / f"pretrain_{'bf16' if bf16 else 'fp32'}_{seed}"
        with strict_fp32() if not bf16 else _null():
            last = train(cfg, paths, work, device=self.device, stop_after_iters=steps, show_progress=False)
        if not bf16 and seed == 0:
            self.checkpoint = last
        return [r["loss"] for r in read_log(work / "log.jsonl")]

    def pretrain_curves(self, paths) -> None:
        """bf16 and a second fp32 seed against `self.fp32_curve` (run first: its checkpoint feeds the rest)."""
        fp32 = self.fp32_curve
        bf16 = self.pretrain(True, 0, paths)
        other = self.pretrain(False, 1, paths)
        tail = max(1, len(fp32) // 5)

        def gap(a, b):
            return float(np.mean(np.abs(np.array(a[-tail:]) - np.array(b[-tail:]))))
        low_gap, noise = gap(bf16, fp32), gap(other, fp32)
        self.curves = {"fp32": fp32, "bf16": bf16, "fp32_seed1": other}
        self.row(f"pretrain loss, last {tail} steps (mean |diff|)", round(float(np.mean(fp32[-tail:])), 4),
                 round(float(np.mean(bf16[-tail:])), 4), low_gap / max(noise, 1e-12),
                 BOUNDS["pretrain_loss_gap_vs_noise"],
                 f"bf16 gap {low_gap:.4f} / fp32 seed gap {noise:.4f}")

    # 2. features of a fixed checkpoint
    def features(self, paths) -> None:
        from densebench.evaluate.backbone import LAYERS
        from densebench.evaluate.checkpoint import build_backbone
        from densebench.evaluate.features import GAP, compute_features, voc_preprocess

        model, _ = build_backbone(self.checkpoint, self.arch)
        layers = list(LAYERS) + [GAP]
        size = 192 if self.quick else 224      # the specified pooling needs >= 192 px
        amp = compute_features(model, paths, layers, voc_preprocess(size + size // 7, size, True), self.device,
                               32, 0, show_progress=False)
        with strict_fp32():
            full = compute_features(model, paths, layers, voc_preprocess(size + size // 7, size, False),
                                    self.device, 32, 0, show_progress=False)
        for layer in layers:
            a, b = amp[layer].astype(np.float64), full[layer].astype(np.float64)
            rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
            cos = float(np.mean(np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                              1e-12)))
            self.row(f"features {layer} (fp16 autocast)", "-", "-", rel, BOUNDS["feature_rel_l2"],
                     f"mean cosine {cos:.6f}")

    # 3 and 4. protocol metrics with amp on and off
    def protocol_pair(self, name: str, overrides: Dict[str, Any], data_root: Path):
        from densebench.evaluate.runner import protocol_module

        module = protocol_module(name)
        outputs = {}
        for amp in (False, True):
            extra = dict(overrides, amp=amp)
            if name.startswith("linear_"):
                extra["channels_last"] = amp
            cfg, _ = make_config(module.Config, name, "tiny" if self.quick else "paper", extra)
            torch.manual_seed(0)
            with strict_fp32() if not amp else _null():
                outputs[amp] = module.run(self.ctx(f"{name}_{amp}", self.checkpoint, data_root), cfg)
        return outputs[False], outputs[True]

    def guarded(self, part, *args) -> None:
        """Run one part; a failure becomes a NO row instead of losing the parts after it."""
        try:
            part(*args)
        except Exception as exc:  # noqa: BLE001
            self.row(f"{part.__name__} FAILED", "-", "-", float("inf"), 0.0, f"{type(exc).__name__}: {exc}"[:200])

    def svm_voc07(self, data_root: Path) -> None:
        full, amp = self.protocol_pair("svm_voc07", {}, data_root)
        for layer in ("feat1", "feat2", "feat3", "feat4", "feat5"):
            a, b = amp.metrics[layer]["mAP"], full.metrics[layer]["mAP"]
            self.row(f"svm_voc07 {layer} mAP", round(b, 3), round(a, 3), abs(a - b), BOUNDS["svm_map_points"])

    def knn_imagenet(self, data_root: Path) -> None:
        full, amp = self.protocol_pair("knn_imagenet", {}, data_root)
        a, b = amp.metrics["k20"]["top1"], full.metrics["k20"]["top1"]
        self.row("knn_imagenet k20 top-1", round(b, 3), round(a, 3), abs(a - b), BOUNDS["knn_top1_points"])

    def linear_imagenet(self, data_root: Path) -> None:
        probe = {"epochs": 2, "lr_steps": [], "num_classes": 20 if not self.quick else 10, "eval_interval": 1,
                 "lr": 0.3, "batch_size": 64 if not self.quick else 32}
        full, amp = self.protocol_pair("linear_imagenet", probe, data_root)
        a, b = amp.metrics["avgpool"]["top1"], full.metrics["avgpool"]["top1"]
        self.row("linear_imagenet top-1 (2 epochs, bf16)", round(b, 3), round(a, 3), abs(a - b),
                 BOUNDS["probe_top1_points"])

    def det_voc0712_c4(self, data_root: Path) -> None:
        det = {"max_iter": 40 if not self.quick else 4, "images_per_step": 2, "lr_steps": [], "warmup_iters": 10,
               "eval_interval": 10**6, "checkpoint_interval": 10**6, "max_test_images": 20 if not self.quick else 2,
               "log_interval": 10 if not self.quick else 2, "train_min_sizes": [480, 512, 544, 576, 608, 640]}
        if self.quick:
            det.pop("train_min_sizes")
        full, amp = self.protocol_pair("det_voc0712_c4", det, data_root)
        a = statistics.mean(e["loss"] for e in amp.extra["loss_history"][-2:])
        b = statistics.mean(e["loss"] for e in full.extra["loss_history"][-2:])
        self.row("det_voc0712_c4 loss, last logged windows (fp16)", round(b, 4), round(a, 4),
                 abs(a - b) / max(abs(b), 1e-12), BOUNDS["det_loss_rel"],
                 f"AP50 {full.metrics['bbox'].get('AP50')} vs {amp.metrics['bbox'].get('AP50')}")

    def report(self) -> bool:
        print("\nverdict (same seeds; 'low' = the default bf16/fp16 autocast, 'fp32' = full fp32, TF32 off)")
        header = ["what", "fp32", "low", "diff", "bound", "ok", "note"]
        rows = [[r["what"], str(r["fp32"]), str(r["low"]), f"{r['diff']:.4g}", f"{r['bound']:g}",
                 "yes" if r["ok"] else "NO", r["note"]] for r in self.rows]
        widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        harmless = all(r["ok"] for r in self.rows)
        print(f"\nlow precision {'within every bound' if harmless else 'OUTSIDE a bound (see NO rows)'}")
        return harmless


@contextmanager
def _null():
    yield


def write_data(root: Path, quick: bool) -> Path:
    """The synthetic ImageNet / VOC07 / VOC12 layouts at 'small' sizes (fewer images when quick)."""
    from densebench.data import synth

    spec = synth.SCALES["tiny" if quick else "small"]
    if not quick:
        spec = dataclasses.replace(spec, voc_size=(500, 375))
    for name, writer, where in synth.WRITERS:
        if name in ("imagenet", "VOCdevkit/VOC2007", "VOCdevkit/VOC2012"):
            writer(where(root), spec, 0)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, tiny sizes, few steps (CPU check)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default 1500 (20 quick)")
    parser.add_argument("--pretrain-size", type=int, default=None, help="pre-training crop, default 128 (32 quick)")
    parser.add_argument("--batch", type=int, default=None, help="pre-training batch, default 32 (4 quick)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("precision_check: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    args.pretrain_steps = args.pretrain_steps or (20 if args.quick else 1500)
    args.pretrain_size = args.pretrain_size or (32 if args.quick else 128)
    args.batch = args.batch or (4 if args.quick else 32)
    from concurrent.futures import ProcessPoolExecutor

    from table_cost import write_jpegs

    check = Check(args)
    tic = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=1) as pool:       # forked before CUDA is touched
            layouts = pool.submit(write_data, check.root / "data", args.quick)
            files = write_jpegs(check.root / "jpeg", 16 if args.quick else 512, (48, 80) if args.quick else (150, 200), 0)
            steps = args.pretrain_steps
            paths = [files[i % len(files)] for i in range((steps + 1) * args.batch)]
            # the fp32 run first (its checkpoint is the "fixed checkpoint" of the other parts), the
            # bf16 and second-seed runs last: a timeout then costs the curve verdict, not the rest
            check.fp32_curve = check.pretrain(False, 0, paths)
            print(f"fp32 pre-training done ({time.perf_counter() - tic:.0f} s)", flush=True)
            check.guarded(check.features, files[: 16 if args.quick else 512])
            print(f"features done ({time.perf_counter() - tic:.0f} s)", flush=True)
            data_root = layouts.result()
        for part in ("svm_voc07", "knn_imagenet", "linear_imagenet", "det_voc0712_c4"):
            check.guarded(getattr(check, part), data_root)
            print(f"{part} done ({time.perf_counter() - tic:.0f} s)", flush=True)
        check.guarded(check.pretrain_curves, paths)
        print(f"pre-training curves done ({time.perf_counter() - tic:.0f} s)", flush=True)
        harmless = check.report()
        if args.json_out:
            args.json_out.write_text(json.dumps({"rows": check.rows, "curves": getattr(check, "curves", None), "harmless": harmless,
                                                 "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    finally:
        shutil.rmtree(check.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
