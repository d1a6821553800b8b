"""`densebench evaluate`: run a list of protocols on one checkpoint, one record per cell.

A cell is (checkpoint, protocol, config, seed); `--seeds 0,1,2` plans one cell per protocol and
seed (the repeated trials the reference detection and segmentation numbers average). Cells whose
record already exists are skipped unless --force, so an interrupted run continues where it
stopped. Before any work, the data of every cell to run is checked (`densebench data check`):
malformed data is an error, and so is absent data for a protocol asked for by name; only under
`--protocols all` is a protocol whose dataset folder is absent skipped, with the reason.
Feature-based protocols run first so that they share the feature cache.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from densebench import distributed as dist_utils
from densebench.config import config_dict, config_hash, is_paper_config, make_config, parse_set_options
from densebench.errors import InputError
from densebench.evaluate.checkpoint import CheckpointInfo, build_backbone
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.results.store import load_records, record_key, record_path, versions, write_record

log = logging.getLogger("densebench.evaluate")

# Execution order: feature-based protocols first (they share the feature cache), then the
# probes, then the fine-tuning transfers.
PROTOCOL_ORDER = (
    "svm_voc07", "lowshot_svm_voc07", "knn_imagenet",
    "linear_imagenet_mhead", "linear_imagenet", "linear_places205_mhead", "linear_inat18_mhead",
    "det_voc0712_c4", "det_coco_maskrcnn_fpn", "seg_voc12aug_fcn", "seg_cityscapes_fcn",
)


@dataclass
class Cell:
    protocol: str
    module: Any
    config: Any
    preset_label: str
    key: str
    seed: int
    missing_data: List[str] = field(default_factory=list)
    done: bool = False


def parse_protocols(spec: str) -> List[str]:
    if spec.strip() in ("", "all"):
        return list(PROTOCOL_ORDER)
    requested = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in requested if name not in PROTOCOL_ORDER]
    if unknown:
        raise InputError(None, f"unknown protocol(s) {', '.join(unknown)}; known: {', '.join(PROTOCOL_ORDER)}")
    return [name for name in PROTOCOL_ORDER if name in requested]


def split_overrides(items: List[str], protocols: List[str]) -> Dict[str, Dict[str, Any]]:
    """`--set svm_voc07.costs=[1.0]` -> {"svm_voc07": {"costs": [1.0]}}."""
    per_protocol: Dict[str, Dict[str, Any]] = {name: {} for name in protocols}
    for key, value in parse_set_options(items).items():
        protocol, _, field_name = key.partition(".")
        if not field_name or protocol not in PROTOCOL_ORDER:
            raise InputError(None, f"--set expects PROTOCOL.FIELD=VALUE, got {key!r}")
        if protocol not in per_protocol:  # a typo'd --protocols would otherwise drop it silently
            raise InputError(None, f"--set {key}: {protocol} is not among the protocols to run "
                                   f"({', '.join(protocols)})")
        per_protocol[protocol][field_name] = value
    return per_protocol


def protocol_module(name: str):
    return importlib.import_module(f"densebench.protocols.{name}")


def check_data(cells: List[Cell], data_root: Path, skip_absent: bool) -> None:
    """Validate the data of every cell to run before anything is computed (one InputError line).

    Each dataset part is checked once however many protocols read it. A protocol whose
    dataset folder is absent is skipped (`cell.missing_data`) when `skip_absent` (`--protocols
    all`), else it is an error; present but malformed data is always an error, never a skip:
    the user would otherwise get exit 0 and a missing row. Protocols that check more than the
    data alone (labels against the configured class count) do so in `module.check_data`.
    """
    from densebench.data.check import PROTOCOL_DATASETS, check_parts

    pending = [cell for cell in cells if not cell.done]
    statuses = check_parts(data_root, [part for cell in pending for part in PROTOCOL_DATASETS[cell.protocol]])
    for cell in pending:
        parts = PROTOCOL_DATASETS[cell.protocol]
        malformed = [statuses[part].detail for part in parts if statuses[part].status == "malformed"]
        absent = [f"{part} missing: {statuses[part].detail}" for part in parts if statuses[part].status == "missing"]
        if malformed or (absent and not skip_absent):
            problem = malformed[0] if malformed else absent[0]
            raise InputError(None, f"{cell.protocol} cannot run: {problem} "
                                   f"(`densebench data check {data_root}` lists every problem)")
        cell.missing_data = absent
    checked = set()  # (protocol, config hash): cells that differ only in the seed are checked once
    for cell in pending:
        config_key = (cell.protocol, config_hash(config_dict(cell.config)))
        if cell.missing_data or not hasattr(cell.module, "check_data") or config_key in checked:
            continue
        checked.add(config_key)
        try:
            cell.module.check_data(data_root, cell.config)
        except InputError as exc:
            raise InputError(None, f"{cell.protocol} cannot run: {exc}") from exc


# Wall seconds of each protocol under the tiny preset, ResNet-18: medians over the 6 cells of
# ./run_all.sh on 2 CPU cores (two single-threaded evaluations side by side, commit 559672d):
# the estimate shown before a first tiny run (later runs use their own records).
TYPICAL_TINY_S = {
    "svm_voc07": 2, "lowshot_svm_voc07": 1, "knn_imagenet": 1, "linear_imagenet_mhead": 10,
    "linear_imagenet": 13, "linear_places205_mhead": 9, "linear_inat18_mhead": 6, "det_voc0712_c4": 63,
    "det_coco_maskrcnn_fpn": 23, "seg_voc12aug_fcn": 8, "seg_cityscapes_fcn": 29,
}


def estimate(earlier: List[Dict[str, Any]], protocol: str, preset: str) -> str:
    """Cost estimate: earlier records of the same protocol and preset in this results dir, else
    the typical tiny cost, else unknown (paper-scale runs take GPU-hours to GPU-days)."""
    walls = [r["wall_s"] for r in earlier if r["protocol"] == protocol and r["preset"] == preset]
    if walls:
        return f"~{statistics.median(walls):.0f} s (median of {len(walls)} earlier run(s))"
    if preset == "tiny":
        return f"~{TYPICAL_TINY_S[protocol]} s (typical on 2 CPU cores, ResNet-18)"
    return "unknown (no earlier run here; paper scale takes GPU-hours per protocol)"


def build_configs(args, protocols: List[str]) -> Dict[str, Tuple[Any, str]]:
    """protocol -> (config, preset label), every --set value checked against its field's type."""
    overrides = split_overrides(args.set, protocols)
    return {name: make_config(protocol_module(name).Config, name, args.preset, overrides[name]) for name in protocols}


def evaluation_seeds(args) -> List[int]:
    return list(args.seeds) if getattr(args, "seeds", None) else [args.seed]


def plan_cells(args, configs: Dict[str, Tuple[Any, str]], info: CheckpointInfo, results_dir: Path,
               data_root: Path) -> List[Cell]:
    """Seed-major order: every protocol under the first seed, then the next seed, so an
    interrupted multi-seed run already holds complete tables for its first seeds."""
    cells = []
    for seed in evaluation_seeds(args):
        for name, (cfg, label) in configs.items():
            key = record_key(name, info.sha256, config_hash(config_dict(cfg)), seed)
            cell = Cell(name, protocol_module(name), cfg, label, key, seed)
            cell.done = record_path(results_dir, key).is_file() and not args.force
            cells.append(cell)
    check_data(cells, data_root, skip_absent=args.protocols.strip() in ("", "all"))
    return cells


def print_plan(cells: List[Cell], info: CheckpointInfo, results_dir: Path, preset: str) -> None:
    print(f"checkpoint: {info.path} ({info.format}, {info.arch}, sha256 {info.sha256[:12]})")
    print(f"results:    {results_dir}")
    width = max(len(c.protocol) for c in cells)
    several_seeds = len({c.seed for c in cells}) > 1
    earlier = load_records(results_dir) if (results_dir / "records").is_dir() else []
    for cell in cells:
        if cell.done:
            status = "done (record exists; --force to redo)"
        elif cell.missing_data:
            status = "skip: " + "; ".join(cell.missing_data)
        else:
            status = f"run [{cell.preset_label}] est. {estimate(earlier, cell.protocol, preset)}"
        seed = f"  seed {cell.seed}" if several_seeds else ""
        print(f"  {cell.protocol:<{width}}{seed}  {status}")


def default_workers(device: torch.device) -> int:
    """Data-loading workers per process: enough to feed a GPU; none on CPU, where decoding in the
    main process is as fast as handing images over from worker processes at tiny scale."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, dist_utils.world_size()) - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_record(cell: Cell, info: CheckpointInfo, name: str, output: ProtocolOutput, seed: int,
                 device: torch.device, wall_s: float, started: str) -> Dict[str, Any]:
    cfg = config_dict(cell.config)
    comparable = cell.preset_label == "paper" and is_paper_config(cell.config)
    return {
        "protocol": cell.protocol,
        "checkpoint": dict(info.record(), name=name),
        "metrics": output.metrics,
        "config": cfg,
        "config_hash": config_hash(cfg),
        "preset": cell.preset_label,
        "comparable": comparable,
        "seed": seed,
        "world_size": dist_utils.world_size(),
        "device": dist_utils.device_description(device),
        "wall_s": round(wall_s, 2),
        "started": started,
        "versions": versions(),
        "data": output.data,
        "extra": output.extra,
    }


def run_cell(cell: Cell, args, info: CheckpointInfo, results_dir: Path, data_root: Path,
             device: torch.device) -> Path:
    ctx = RunContext(
        checkpoint=Path(args.ckpt), data_root=data_root,
        work_dir=results_dir / "work" / cell.key, cache_dir=results_dir / "cache" / "features",
        seed=cell.seed, device=device, arch=args.arch, allow_unsafe_pickle=args.allow_unsafe_pickle,
        save_features_dir=Path(args.save_features) if args.save_features else None,
        num_workers=args.workers if args.workers is not None else default_workers(device),
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cell.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tic = time.perf_counter()
    output = cell.module.run(ctx, cell.config)
    wall = time.perf_counter() - tic
    name = args.name or Path(args.ckpt).stem
    record = build_record(cell, info, name, output, cell.seed, device, wall, started)
    if dist_utils.is_main():
        return write_record(results_dir, record)
    return record_path(results_dir, cell.key)


def main(args) -> int:
    device = dist_utils.init_distributed()
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise InputError(data_root, "data root not found")
    results_dir = Path(args.out)
    configs = build_configs(args, parse_protocols(args.protocols))   # a bad --set fails here, exit 1
    # Load (strictly) before planning: a checkpoint that does not import fails here, exit 1.
    _, info = build_backbone(args.ckpt, args.arch, args.allow_unsafe_pickle)
    cells = plan_cells(args, configs, info, results_dir, data_root)
    if dist_utils.is_main():
        print_plan(cells, info, results_dir, args.preset)
    failures = []
    for cell in cells:
        if cell.done or cell.missing_data:
            continue
        log.info("running %s [%s] seed %d", cell.protocol, cell.preset_label, cell.seed)
        try:
            path = run_cell(cell, args, info, results_dir, data_root, device)
        except InputError as exc:
            log.error("%s failed: %s", cell.protocol, exc)
            failures.append(f"{cell.protocol} seed {cell.seed}: {exc}")
            continue
        if dist_utils.is_main():
            print(f"  {cell.protocol} seed {cell.seed}: record {path}")
    skipped = {c.protocol: c for c in cells if c.missing_data and not c.done}     # once, not per seed
    if dist_utils.is_main():
        for cell in skipped.values():
            print(f"  {cell.protocol}: skipped ({'; '.join(cell.missing_data)})")
        for failure in failures:
            print(f"  failed: {failure}")
    dist_utils.barrier()
    return 1 if failures else 0
