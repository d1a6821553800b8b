"""`densebench report`: markdown, CSV and PNG reports regenerated from result records only.

The page follows the published DenseCL results page: VOC07 SVM and low-shot, ImageNet linear
(Feature1-5, AvgPool), Places205, iNat18, kNN, VOC detection, COCO, VOC-Aug and Cityscapes
segmentation. Each of our numbers stands beside the published one with the delta, but only
for comparable runs (paper protocol, unaltered config); tiny, fast or altered runs are marked
and never shown as a reproduction. Output is a pure function of the records (and the
pre-training logs under RESULTS_DIR/pretrain): the same inputs give byte-identical files.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import yaml

from densebench.errors import InputError
from densebench.io import read_jsonl, write_text_atomic
from densebench.results.store import load_records

PUBLISHED_FILE = Path(__file__).resolve().parent / "published.yaml"
NOT_COMPARABLE = "‡"


@dataclass(frozen=True)
class Column:
    header: str
    protocol: str
    metric: str          # dotted path into record["metrics"]


@dataclass(frozen=True)
class Section:
    slug: str
    title: str
    columns: Tuple[Column, ...]


LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)
FEATURES = ("feat1", "feat2", "feat3", "feat4", "feat5")


def _feature_columns(protocol: str) -> Tuple[Column, ...]:
    return tuple(Column(f"Feature{i}", protocol, f"feat{i}.top1") for i in range(1, 6))


SECTIONS: Tuple[Section, ...] = (
    Section("voc07_svm", "VOC07 SVM and low-shot SVM (feature5, mAP %)",
            (Column("SVM", "svm_voc07", "feat5.mAP"),)
            + tuple(Column(f"k={k}", "lowshot_svm_voc07", f"feat5.k{k}.mAP") for k in LOWSHOT_KS)),
    Section("imagenet_linear", "ImageNet linear evaluation (top-1 %)",
            _feature_columns("linear_imagenet_mhead") + (Column("AvgPool", "linear_imagenet", "avgpool.top1"),)),
    Section("places205_linear", "Places205 linear evaluation (top-1 %)", _feature_columns("linear_places205_mhead")),
    Section("inat18_linear", "iNaturalist-2018 linear evaluation (top-1 %)", _feature_columns("linear_inat18_mhead")),
    Section("imagenet_knn", "ImageNet k-NN (top-1 %)",
            tuple(Column(f"k={k}", "knn_imagenet", f"k{k}.top1") for k in (10, 20, 100, 200))),
    Section("voc_detection", "VOC07+12 detection, Faster R-CNN R50-C4 (VOC07 test, %)",
            (Column("AP50", "det_voc0712_c4", "bbox.AP50"), Column("AP", "det_voc0712_c4", "bbox.AP"),
             Column("AP75", "det_voc0712_c4", "bbox.AP75"))),
    Section("coco_detection", "COCO Mask R-CNN R50-FPN 1x (val2017, %)",
            tuple(Column(f"{kind} {m}", "det_coco_maskrcnn_fpn", f"{key}.{m}")
                  for kind, key in (("box", "bbox"), ("mask", "segm")) for m in ("AP", "AP50", "AP75"))),
    Section("segmentation", "Semantic segmentation, FCN R50-D8 (mIoU %)",
            (Column("VOC12-Aug", "seg_voc12aug_fcn", "mIoU"), Column("Cityscapes", "seg_cityscapes_fcn", "mIoU"))),
)

ZOO_COLUMNS: Tuple[Column, ...] = (
    Column("VOC SVM", "svm_voc07", "feat5.mAP"),
    Column("Low-shot k=1", "lowshot_svm_voc07", "feat5.k1.mAP"),
    Column("Low-shot k=96", "lowshot_svm_voc07", "feat5.k96.mAP"),
    Column("IN F5", "linear_imagenet_mhead", "feat5.top1"),
    Column("IN AvgPool", "linear_imagenet", "avgpool.top1"),
    Column("Places F5", "linear_places205_mhead", "feat5.top1"),
    Column("iNat F5", "linear_inat18_mhead", "feat5.top1"),
    Column("kNN k=20", "knn_imagenet", "k20.top1"),
    Column("VOC det AP50", "det_voc0712_c4", "bbox.AP50"),
    Column("COCO box AP", "det_coco_maskrcnn_fpn", "bbox.AP"),
    Column("COCO mask AP", "det_coco_maskrcnn_fpn", "segm.AP"),
    Column("VOC seg mIoU", "seg_voc12aug_fcn", "mIoU"),
    Column("City mIoU", "seg_cityscapes_fcn", "mIoU"),
)


# ---------------------------------------------------------------- published numbers
def load_published(path: Path = PUBLISHED_FILE) -> Dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "values" not in data:
        raise InputError(path, "published numbers file lacks a `values` mapping")
    return data


def published_value(published: Dict[str, Any], column: Column) -> Optional[float]:
    entry = (published["values"].get(column.protocol) or {}).get(column.metric)
    return None if entry is None else float(entry["value"])


# ---------------------------------------------------------------- records -> rows
def metric_value(metrics: Dict[str, Any], path: str) -> Optional[float]:
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None
    return float(node)


def paper_config(protocol: str) -> Optional[Dict[str, Any]]:
    """The paper config of a protocol as the current code defines it (None if unknown)."""
    import importlib

    from densebench.config import config_dict

    try:
        module = importlib.import_module(f"densebench.protocols.{protocol}")
    except ImportError:
        return None
    return config_dict(module.Config())


def is_comparable(record: Dict[str, Any]) -> bool:
    """Comparable only when the record says so AND its config equals the paper protocol.

    The flag is not trusted alone: a record whose config differs from the paper defaults
    (edited by hand, or written by an older version with other defaults) is not comparable.
    """
    return (record.get("comparable") is True and record.get("preset") == "paper"
            and record.get("config") == paper_config(record["protocol"]))


@dataclass(frozen=True)
class Stat:
    """One table cell over seeds: the per-seed values, their mean and sample std (ddof=1)."""
    values: Dict[int, float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values.values()) if self.n > 1 else None


@dataclass
class Row:
    """One checkpoint under one preset label: per protocol, the latest record of each seed.

    Only records of the protocol's latest config count, so a cell never mixes configs."""
    name: str
    sha256: str
    arch: str
    preset: str
    records: Dict[str, Dict[int, Dict[str, Any]]]

    @property
    def label(self) -> str:
        return f"{self.name} [{self.preset}]"

    def seeds(self) -> List[int]:
        """Every seed that any cell of this checkpoint has: what a complete cell holds."""
        return sorted({seed for by_seed in self.records.values() for seed in by_seed})

    def comparable(self, protocol: str) -> bool:
        by_seed = self.records.get(protocol)
        return bool(by_seed) and all(is_comparable(r) for r in by_seed.values())

    def stat(self, column: Column) -> Optional[Stat]:
        by_seed = self.records.get(column.protocol) or {}
        values = {seed: metric_value(r["metrics"], column.metric) for seed, r in sorted(by_seed.items())}
        values = {seed: v for seed, v in values.items() if v is not None}
        return Stat(values) if values else None

    def missing_seeds(self, column: Column) -> List[int]:
        stat = self.stat(column)
        return [] if stat is None else [s for s in self.seeds() if s not in stat.values]


def build_rows(records: Sequence[Dict[str, Any]]) -> List[Row]:
    rows: Dict[Tuple[str, str, str], Row] = {}
    for record in sorted(records, key=lambda r: (r["started"], r.get("key", ""))):
        ckpt = record["checkpoint"]
        name = ckpt.get("name") or Path(ckpt["path"]).stem
        group = (name, ckpt["sha256"], record["preset"])
        row = rows.setdefault(group, Row(name, ckpt["sha256"], ckpt.get("arch", "?"), record["preset"], {}))
        by_seed = row.records.setdefault(record["protocol"], {})
        if any(r["config_hash"] != record["config_hash"] for r in by_seed.values()):
            by_seed.clear()                       # a newer config of the protocol replaces the older
        by_seed[int(record["seed"])] = record     # the latest record of a (protocol, seed) wins
    return [rows[k] for k in sorted(rows)]


# ---------------------------------------------------------------- formatting
def fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_cell(row: Row, column: Column, published: Optional[float]) -> str:
    """`mean ± std (n=N)` over seeds (just the value for one seed), the seeds this cell lacks
    that other cells of the checkpoint have, then ‡ or the delta of the mean to the paper."""
    stat = row.stat(column)
    if stat is None:
        return "–"
    text = f"{stat.mean:.2f}" if stat.n == 1 else f"{stat.mean:.2f} ± {stat.std:.2f} (n={stat.n})"
    missing = row.missing_seeds(column)
    if missing:
        text += f" [missing seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}]"
    if not row.comparable(column.protocol):
        return f"{text} {NOT_COMPARABLE}"
    if published is None:
        return text
    return f"{text} ({stat.mean - published:+.2f})"


def per_seed_rows(row: Row, columns: Sequence[Column], base: Dict[str, Any]) -> List[Dict[str, Any]]:
    """CSV rows of one checkpoint: one per seed, then mean, std (ddof=1) and n when seeds > 1."""
    stats = {c.header: row.stat(c) for c in columns}
    seeds = sorted({seed for stat in stats.values() if stat for seed in stat.values})
    out = [{**base, "seed": str(seed), **{h: st.values.get(seed) if st else None for h, st in stats.items()}}
           for seed in seeds]
    if len(seeds) > 1:
        out.append({**base, "seed": "mean", **{h: st.mean if st else None for h, st in stats.items()}})
        out.append({**base, "seed": "std", **{h: st.std if st else None for h, st in stats.items()}})
        out.append({**base, "seed": "n", **{h: st.n if st else 0 for h, st in stats.items()}})
    return out


def section_frames(section: Section, rows: List[Row], published: Dict[str, Any]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(markdown-ready strings, per-seed numbers for CSV) for one section."""
    pub = [published_value(published, c) for c in section.columns]
    display = [["Published DenseCL"] + [fmt(v) for v in pub]]
    raw = [{"checkpoint": "published", "sha256": "", "preset": "paper", "comparable": True, "seed": "",
            **{c.header: v for c, v in zip(section.columns, pub)}}]
    for row in rows:
        if not any(c.protocol in row.records for c in section.columns):
            continue
        display.append([row.label] + [fmt_cell(row, c, p) for c, p in zip(section.columns, pub)])
        base = {"checkpoint": row.name, "sha256": row.sha256[:12], "preset": row.preset,
                "comparable": all(row.comparable(c.protocol) for c in section.columns if c.protocol in row.records)}
        raw += per_seed_rows(row, section.columns, base)
    headers = ["Model"] + [c.header for c in section.columns]
    return pd.DataFrame(display, columns=headers), pd.DataFrame(raw)


def markdown_table(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def runs_table(records: Sequence[Dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in sorted(records, key=lambda r: (r["checkpoint"].get("name", ""), r["protocol"], r.get("key", ""))):
        rows.append([r["checkpoint"].get("name", ""), r["protocol"], r["preset"],
                     "yes" if is_comparable(r) else "no", str(r["seed"]), str(r["world_size"]), r["device"],
                     f"{r['wall_s']:.0f}", r["config_hash"], r["checkpoint"]["sha256"][:12]])
    return pd.DataFrame(rows, columns=["Checkpoint", "Protocol", "Preset", "Comparable", "Seed", "World",
                                       "Device", "Wall s", "Config", "sha256"])


# ---------------------------------------------------------------- plots
def _save_png(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})


def plot_lowshot(rows: List[Row], published: Dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = SECTIONS[0]
    lowshot = [c for c in section.columns if c.protocol == "lowshot_svm_voc07"]
    series = []
    for row in rows:
        points = [(k, row.stat(c)) for k, c in zip(LOWSHOT_KS, lowshot) if row.stat(c) is not None]
        if points:
            series.append((row.label + ("" if row.comparable("lowshot_svm_voc07") else f" {NOT_COMPARABLE}"), points))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    pub = [(k, published_value(published, c)) for k, c in zip(LOWSHOT_KS, lowshot)]
    ax.plot([k for k, _ in pub], [v for _, v in pub], "k--o", label="Published DenseCL")
    for label, points in series:        # error bars: sample std over seeds (none for one seed)
        ax.errorbar([k for k, _ in points], [st.mean for _, st in points],
                    yerr=[st.std or 0.0 for _, st in points], fmt="-o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("positives per class k")
    ax.set_ylabel("VOC07 test mAP (%)")
    ax.set_title("Low-shot SVM (feature5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def read_pretrain_logs(results_dir: Path) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """JSON-lines logs of pre-training runs kept under RESULTS_DIR/pretrain/<run>/log.jsonl; a
    partial last line (a run killed while appending, or still running) is left out."""
    logs = []
    for path in sorted((results_dir / "pretrain").glob("*/log.jsonl")):
        entries = [entry for _, entry in read_jsonl(path) if "iteration" in entry and "loss" in entry]
        if entries:
            logs.append((path.parent.name, entries))
    return logs


def plot_pretrain(logs, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not logs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entries in logs:
        its = [e["iteration"] for e in entries]
        ax.plot(its, [e["loss"] for e in entries], label=f"{name} total")
        for part in ("loss_global", "loss_dense"):
            if all(part in e for e in entries):
                ax.plot(its, [e[part] for e in entries], "--", label=f"{name} {part[5:]}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("DenseCL pre-training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def per_class_values(record: Dict[str, Any]) -> Optional[Dict[str, Optional[float]]]:
    """{class name: value} in class order from a record's extra, for the protocols that store it."""
    extra = record.get("extra") or {}
    if record["protocol"] == "svm_voc07":
        layer = (extra.get("per_layer") or {}).get("feat5") or {}
        if extra.get("classes") and layer.get("class_AP"):
            return dict(zip(extra["classes"], layer["class_AP"]))
    elif record["protocol"].startswith("seg_"):
        ious = extra.get("per_class_IoU")
        if isinstance(ious, dict):
            return {name: ious.get(name) for name in extra.get("class_names", sorted(ious))}
    return None


def per_class_stats(by_seed: Dict[int, Dict[str, Any]]) -> Optional[Dict[str, Tuple[float, float]]]:
    """{class: (mean, sample std or 0)} over the seeds of one cell; None = no per-class values.
    A class absent from a split (None) counts as 0, as it is drawn."""
    per_seed = [v for v in (per_class_values(r) for _, r in sorted(by_seed.items())) if v]
    if not per_seed:
        return None
    out = {}
    for name in per_seed[0]:
        values = [float(v.get(name) or 0.0) for v in per_seed]
        out[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def plot_per_class(rows: List[Row], protocol: str, ylabel: str, path: Path) -> bool:
    """Grouped bars of per-class values (AP or IoU) of every row that has a record of `protocol`:
    the mean over seeds, with the sample std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [(row.label, per_class_stats(row.records[protocol])) for row in rows if protocol in row.records]
    series = [(label, stats) for label, stats in series if stats]
    if not series:
        return False
    classes = list(series[0][1])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 4))
    for i, (label, stats) in enumerate(series):
        means = [stats.get(c, (0.0, 0.0))[0] for c in classes]
        stds = [stats.get(c, (0.0, 0.0))[1] for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2)
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(protocol)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- pages
def published_sources(published: Dict[str, Any]) -> List[str]:
    lines = [f"- `{key}`: {text}" for key, text in published["sources"].items()]
    for protocol, metrics in published["values"].items():
        for metric, entry in (metrics or {}).items():
            for alt in entry.get("alternatives", []):
                note = f" ({alt['note']})" if alt.get("note") else ""
                lines.append(f"- {protocol} `{metric}`: published as {entry['value']} (`{entry['source']}`), "
                             f"also {alt['value']} (`{alt['source']}`){note}; the first is shown.")
    for entry in published.get("other", []):
        lines.append(f"- {entry['protocol']} `{entry['metric']}` = {entry['value']} (`{entry['source']}`): "
                     f"{entry['note']}; not used for deltas.")
    return lines


LEGEND = (f"Our numbers from comparable runs (paper protocol, unaltered config) show the delta to the "
          f"published value in parentheses. {NOT_COMPARABLE} marks a run that is **not comparable** "
          f"(tiny preset, fast mode or an altered config): it checks that the pipeline works and is "
          f"never a reproduction of the published number. – means no record or no published value. "
          f"With several evaluation seeds a cell shows mean ± std (n=seeds), std being the sample "
          f"standard deviation (ddof=1), and the delta is that of the mean; [missing seed S] names "
          f"seeds that other cells of the same checkpoint have and this one lacks. Per-seed values "
          f"are in the CSV files; error bars in the figures are the same std.")


def results_page(records, rows, published, assets: Path, asset_prefix: str, results_dir: Path) -> str:
    parts = ["# densebench results", "", f"Regenerated from {len(records)} record(s) by `densebench report`.",
             "", LEGEND, ""]
    for section in SECTIONS:
        display, raw = section_frames(section, rows, published)
        raw.to_csv(assets / f"{section.slug}.csv", index=False, float_format="%.4f")
        parts += [f"## {section.title}", "", markdown_table(display), ""]
    figures = []
    if plot_lowshot(rows, published, assets / "lowshot.png"):
        figures.append(("Low-shot SVM: mAP vs k", "lowshot.png"))
    if plot_pretrain(read_pretrain_logs(results_dir), assets / "pretrain_loss.png"):
        figures.append(("Pre-training loss", "pretrain_loss.png"))
    if plot_per_class(rows, "svm_voc07", "AP (%)", assets / "svm_voc07_per_class.png"):
        figures.append(("VOC07 SVM per-class AP (feature5)", "svm_voc07_per_class.png"))
    for protocol, title in (("seg_voc12aug_fcn", "VOC12-Aug"), ("seg_cityscapes_fcn", "Cityscapes")):
        if plot_per_class(rows, protocol, "IoU (%)", assets / f"{protocol}_per_class.png"):
            figures.append((f"{title} per-class IoU", f"{protocol}_per_class.png"))
    if figures:
        parts += ["## Figures", ""]
        for title, name in figures:
            parts += [f"![{title}]({asset_prefix}/{name})", ""]
    runs = runs_table(records)
    runs.to_csv(assets / "runs.csv", index=False)
    parts += ["## Runs", "", "What produced each number (device, world size, seed, config hash).", "",
              markdown_table(runs), "", "## Sources of the published numbers", ""]
    parts += published_sources(published) + [""]
    return "\n".join(parts)


def zoo_page(records, rows, published, assets: Path) -> str:
    table = [["Published DenseCL", "resnet50", "paper"] + [fmt(published_value(published, c)) for c in ZOO_COLUMNS]]
    raw = [{"checkpoint": "published", "arch": "resnet50", "preset": "paper", "seed": "",
            **{c.header: published_value(published, c) for c in ZOO_COLUMNS}}]
    for row in rows:
        table.append([row.label, row.arch, row.preset]
                     + [fmt_cell(row, c, published_value(published, c)) for c in ZOO_COLUMNS])
        raw += per_seed_rows(row, ZOO_COLUMNS, {"checkpoint": row.name, "arch": row.arch, "preset": row.preset})
    pd.DataFrame(raw).to_csv(assets / "zoo.csv", index=False, float_format="%.4f")
    frame = pd.DataFrame(table, columns=["Model", "Arch", "Preset"] + [c.header for c in ZOO_COLUMNS])
    return "\n".join(["# densebench model zoo", "", f"Regenerated from {len(records)} record(s).", "",
                      LEGEND, "", markdown_table(frame), ""])


def write_report(results_dir: "str | Path", out: "str | Path | None" = None, zoo: bool = False) -> Path:
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    if not records:
        raise InputError(results_dir / "records", "no records to report")
    published = load_published()
    rows = build_rows(records)
    out = Path(out) if out else results_dir / ("zoo.md" if zoo else "report.md")
    assets = out.parent / f"{out.stem}_files"
    assets.mkdir(parents=True, exist_ok=True)
    if zoo:
        text = zoo_page(records, rows, published, assets)
    else:
        text = results_page(records, rows, published, assets, assets.name, results_dir)
    write_text_atomic(out, text)
    return out


def main(args) -> int:
    out = write_report(args.results_dir, args.out, args.zoo)
    print(f"wrote {out}")
    return 0
