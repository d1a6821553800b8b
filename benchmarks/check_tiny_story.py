"""Check that a `./run_all.sh` results dir tells the DenseCL story (issue 19, item 2).

    python benchmarks/check_tiny_story.py results [--data-root results/data]
        [--pretrained densecl_tiny] [--baseline random_init]

Reads the JSON records (not the report) and checks every criterion, printing one table line
per check and exiting 1 when one fails:

- no degenerate classification number: random init lies above chance + 5 points and below
  90 on every classification protocol; chance is the best constant guess on the same val
  set (the most frequent class for top-1, the positive rate of each class for mAP), computed
  here from the data files;
- both FCN runs of both checkpoints score at least 10 mIoU points above a constant
  prediction of the most frequent class of the same val set (for VOC: background only),
  computed here from the label PNGs, with mmseg's rule that classes absent from both
  prediction and ground truth do not count;
- detection AP50 above 10 for the pre-trained checkpoint (VOC07 and COCO box);
- the pre-trained checkpoint beats random init on at least 8 of the 11 headline metrics by
  more than twice the larger of the two seed-to-seed sample stds (ddof=1, >= 3 seeds each),
  among them VOC detection, COCO box AP and both segmentation protocols.

Means and stds are computed here with numpy from the records, independently of the report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

# (label, protocol, metric path): one headline number per protocol
HEADLINE = (
    ("VOC07 SVM mAP", "svm_voc07", "feat5.mAP"),
    ("Low-shot k=1 mAP", "lowshot_svm_voc07", "feat5.k1.mAP"),
    ("kNN k=20 top-1", "knn_imagenet", "k20.top1"),
    ("IN Feature5 top-1", "linear_imagenet_mhead", "feat5.top1"),
    ("IN AvgPool top-1", "linear_imagenet", "avgpool.top1"),
    ("Places Feature5 top-1", "linear_places205_mhead", "feat5.top1"),
    ("iNat Feature5 top-1", "linear_inat18_mhead", "feat5.top1"),
    ("VOC det AP50", "det_voc0712_c4", "bbox.AP50"),
    ("COCO box AP", "det_coco_maskrcnn_fpn", "bbox.AP"),
    ("VOC12-Aug mIoU", "seg_voc12aug_fcn", "mIoU"),
    ("Cityscapes mIoU", "seg_cityscapes_fcn", "mIoU"),
)
CLASSIFICATION = ("svm_voc07", "lowshot_svm_voc07", "knn_imagenet", "linear_imagenet_mhead", "linear_imagenet",
                  "linear_places205_mhead", "linear_inat18_mhead")
MUST_WIN = ("det_voc0712_c4", "det_coco_maskrcnn_fpn", "seg_voc12aug_fcn", "seg_cityscapes_fcn")
DETECTION_AP50 = (("VOC det AP50", "det_voc0712_c4", "bbox.AP50"), ("COCO box AP50", "det_coco_maskrcnn_fpn", "bbox.AP50"))
MIN_SEEDS, MIN_WINS, CEILING, CHANCE_MARGIN, SEG_MARGIN, AP50_FLOOR = 3, 8, 90.0, 5.0, 10.0, 10.0


# ---------------------------------------------------------------- records
def metric(metrics: dict, path: str) -> Optional[float]:
    node = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def read_values(results: Path) -> Dict[Tuple[str, str, str], Dict[int, float]]:
    """{(checkpoint name, protocol, metric): {seed: value}}, the latest record of each seed."""
    out: Dict[Tuple[str, str, str], Dict[int, float]] = {}
    records = [json.loads(p.read_text()) for p in sorted((results / "records").glob("*.json"))]
    for record in sorted(records, key=lambda r: r["started"]):
        paths = {m for _, p, m in HEADLINE + DETECTION_AP50 if p == record["protocol"]}
        for path in paths:
            value = metric(record["metrics"], path)
            if value is not None:
                out.setdefault((record["checkpoint"]["name"], record["protocol"], path), {})[record["seed"]] = value
    return out


def mean_std(values: Dict[int, float]) -> Tuple[float, float, int]:
    array = np.array(list(values.values()), dtype=float)
    if array.size == 0:
        return float("nan"), float("nan"), 0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan"), int(array.size)


# ---------------------------------------------------------------- chance levels from the data
def top1_chance(labels: List[int]) -> float:
    """Top-1 % of always guessing the most frequent val class."""
    return 100.0 * np.bincount(labels).max() / len(labels)


def map_chance(targets: np.ndarray) -> float:
    """Expected VOC07 mAP % of random scores: each class's positive rate among the scored test
    images (labels 1 present, 0 absent, -1 difficult-only and not scored), averaged."""
    rates = [(col == 1).sum() / (col != -1).sum() for col in targets.T if (col == 1).any()]
    return 100.0 * float(np.mean(rates))


def constant_miou(label_files: List[Path], ignore: int = 255) -> float:
    """mIoU % of predicting the most frequent class everywhere: its IoU is its pixel share,
    every other class present in the ground truth scores 0, absent classes do not count."""
    counts = np.zeros(256, np.int64)
    for path in label_files:
        counts += np.bincount(np.asarray(Image.open(path)).reshape(-1), minlength=256)
    counts[ignore] = 0
    present = np.flatnonzero(counts)
    return 100.0 * counts.max() / counts.sum() / len(present)


def chance_levels(data_root: Path) -> Dict[str, float]:
    from densebench.data import layout
    from densebench.data.imagenet import read_imagenet
    from densebench.data.inat import read_inat18
    from densebench.data.places205 import read_places205
    from densebench.data.voc import read_voc_cls_labels

    imagenet = top1_chance([label for _, label in read_imagenet(layout.imagenet_root(data_root), "val")])
    _, voc_targets = read_voc_cls_labels(layout.voc07_root(data_root), "test")
    voc = map_chance(voc_targets)
    return {"svm_voc07": voc, "lowshot_svm_voc07": voc, "knn_imagenet": imagenet,
            "linear_imagenet_mhead": imagenet, "linear_imagenet": imagenet,
            "linear_places205_mhead": top1_chance([y for _, y in read_places205(layout.places205_root(data_root), "val")]),
            "linear_inat18_mhead": top1_chance([y for _, y in read_inat18(layout.inat18_root(data_root), "val")])}


def constant_mious(data_root: Path) -> Dict[str, float]:
    from densebench.data import layout
    from densebench.data.voc import read_voc_seg

    voc = [label for _, label in read_voc_seg(layout.voc12_root(data_root), "val")]
    city = sorted((layout.cityscapes_root(data_root) / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))
    return {"seg_voc12aug_fcn": constant_miou(voc), "seg_cityscapes_fcn": constant_miou(city)}


# ---------------------------------------------------------------- the checks
def fmt(mean: float, std: float, n: int) -> str:
    return "–" if n == 0 else f"{mean:.2f}" + ("" if n < 2 else f" ± {std:.2f}") + f" (n={n})"


def check(results: Path, data_root: Path, pretrained: str, baseline: str) -> List[Tuple[str, str, Optional[bool]]]:
    """[(check, detail, passed)] for every criterion; passed None = a win or loss on a metric
    that need not be won (it counts only toward the total)."""
    values = read_values(results)
    chance, constant = chance_levels(data_root), constant_mious(data_root)
    rows: List[Tuple[str, str, Optional[bool]]] = []
    for label, protocol, path in HEADLINE:
        if protocol not in CLASSIFICATION:
            continue
        mean, std, n = mean_std(values.get((baseline, protocol, path), {}))
        ok = n > 0 and chance[protocol] + CHANCE_MARGIN < mean < CEILING
        rows.append((f"{label}: {baseline} within (chance+{CHANCE_MARGIN:g}, {CEILING:g})",
                     f"{fmt(mean, std, n)}; chance {chance[protocol]:.2f}", ok))
    for label, protocol, path in HEADLINE:
        if protocol not in constant:
            continue
        for name in (pretrained, baseline):
            mean, std, n = mean_std(values.get((name, protocol, path), {}))
            floor = constant[protocol] + SEG_MARGIN
            rows.append((f"{label}: {name} >= constant-prediction mIoU + {SEG_MARGIN:g}",
                         f"{fmt(mean, std, n)}; constant {constant[protocol]:.2f}", n > 0 and mean >= floor))
    for label, protocol, path in DETECTION_AP50:
        mean, std, n = mean_std(values.get((pretrained, protocol, path), {}))
        rows.append((f"{label}: {pretrained} > {AP50_FLOOR:g}", fmt(mean, std, n), n > 0 and mean > AP50_FLOOR))
    wins = []
    for label, protocol, path in HEADLINE:
        ours = mean_std(values.get((pretrained, protocol, path), {}))
        base = mean_std(values.get((baseline, protocol, path), {}))
        enough = min(ours[2], base[2]) >= MIN_SEEDS
        margin = 2 * max(ours[1], base[1]) if enough else float("nan")
        won = enough and ours[0] - base[0] > margin
        if won:
            wins.append(protocol)
        rows.append((f"{label}: {pretrained} - {baseline} > 2 x max std",
                     f"{fmt(*ours)} vs {fmt(*base)}; diff {ours[0] - base[0]:+.2f}, 2 x std {margin:.2f}"
                     + ("" if enough else f"; fewer than {MIN_SEEDS} seeds"),
                     won if protocol in MUST_WIN or won else None))
    rows.append((f"{pretrained} wins on >= {MIN_WINS} of {len(HEADLINE)} headline metrics",
                 f"{len(wins)} wins: {', '.join(wins) or 'none'}", len(wins) >= MIN_WINS))
    return [(name, detail, None if ok is None else bool(ok)) for name, detail, ok in rows]   # numpy bools


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results dir of ./run_all.sh (holds records/)")
    parser.add_argument("--data-root", default=None, help="synthetic data (default RESULTS/data)")
    parser.add_argument("--pretrained", default="densecl_tiny")
    parser.add_argument("--baseline", default="random_init")
    args = parser.parse_args(argv)
    results = Path(args.results)
    data_root = Path(args.data_root) if args.data_root else results / "data"
    for path, what in ((results / "records", "records folder"), (data_root, "data root")):
        if not path.is_dir():
            print(f"check_tiny_story: {path}: {what} not found", file=sys.stderr)
            return 1
    rows = check(results, data_root, args.pretrained, args.baseline)
    width = max(len(name) for name, _, _ in rows)
    for name, detail, ok in rows:
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'lost'}  {name:<{width}}  {detail}")
    checks = [ok for _, _, ok in rows if ok is not None]
    failed = checks.count(False)
    print(f"{len(checks) - failed} of {len(checks)} checks pass ('lost': no win on a metric that need not be won)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
