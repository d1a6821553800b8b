"""The `densebench` command: argparse subcommands, each a thin call into its module.

Exit codes: 0 done, 1 bad input (one line naming the file and the problem), 2 usage error.
Usage errors are what argparse finds on its own: an unknown option, a value that is not a
number, outside its range or outside the option's choices. Everything densebench checks
against what a value refers to (a protocol name, an architecture, a `--set` config field, a
file or folder) is bad input, exit 1. Either way the message is one line, before any work.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import List, Optional

from densebench.errors import InputError
from densebench.system import retain_freed_memory

PROTOCOLS = (
    "svm_voc07", "lowshot_svm_voc07", "knn_imagenet",
    "linear_imagenet_mhead", "linear_imagenet", "linear_places205_mhead", "linear_inat18_mhead",
    "det_voc0712_c4", "det_coco_maskrcnn_fpn", "seg_voc12aug_fcn", "seg_cityscapes_fcn",
)

# subcommand -> "module:function"; imported only when used so `densebench --help` is instant
HANDLERS = {
    "data synth": "densebench.data.synth:main",
    "data check": "densebench.data.check:main",
    "pretrain": "densebench.pretrain.trainer:main",
    "inspect": "densebench.evaluate.checkpoint:inspect_main",
    "convert": "densebench.evaluate.convert:main",
    "evaluate": "densebench.evaluate.runner:main",
    "report": "densebench.results.report:main",
}


# subcommand -> the options that name something it writes: (attribute, option, "dir" or "file").
# Checked before the handler runs, so a path of the wrong kind fails in one line before any work.
OUTPUTS = {
    "data synth": (("out", "OUT", "dir"),),
    "pretrain": (("work_dir", "--work-dir", "dir"),),
    "convert": (("out", "--out", "file"),),
    "evaluate": (("out", "--out", "dir"), ("save_features", "--save-features", "dir")),
    "report": (("out", "--out", "file"),),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block it prints first hides the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bounded_int(low: int, high: Optional[int] = None):
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {value}")
        return value
    return parse


SEED = bounded_int(0, 2 ** 32 - 1)          # the seeds numpy accepts


def check_output(path: Optional[str], option: str, kind: str) -> None:
    """`path` can be created or written as a `kind` ("dir" or "file"): one line naming `option` if not."""
    if path is None:
        return
    target = Path(path)
    if kind == "dir" and target.exists() and not target.is_dir():
        raise InputError(target, f"{option} must be a directory, but this is a file")
    if kind == "file" and target.is_dir():
        raise InputError(target, f"{option} must be a file name, but this is a directory")
    parent = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if parent != target.absolute() and not parent.is_dir():
        raise InputError(target, f"{option} cannot be created: {parent} is a file")


def seed_list(text: str) -> List[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]: distinct seeds in numpy's range, in the order given."""
    try:
        values = [SEED(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"in {text!r}: {error}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="densebench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthetic benchmark data and dataset checks")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic benchmark in the real dataset layouts")
    synth.add_argument("out", help="output root (gets imagenet/, VOCdevkit/, coco/, ...)")
    synth.add_argument("--scale", choices=("tiny", "small"), default="tiny")
    synth.add_argument("--seed", type=SEED, default=0)
    check = data_sub.add_parser("check", help="report which dataset parts each protocol finds")
    check.add_argument("root", help="data root (holds imagenet/, VOCdevkit/, coco/, ...)")
    check.add_argument("--protocols", default="all", help="all or a comma-separated list")
    check.add_argument("--json", action="store_true", help="machine-readable output")

    pre = sub.add_parser("pretrain", help="DenseCL pre-training")
    pre.add_argument("--data", required=True, help="ImageNet-style folder (train/ or meta/train.txt)")
    pre.add_argument("--work-dir", required=True)
    pre.add_argument("--preset", choices=("tiny", "paper"), default="paper")
    pre.add_argument("--arch", default=None, help="resnet50 (default) or resnet18")
    pre.add_argument("--resume", action="store_true", help="continue from WORK_DIR/latest")
    pre.add_argument("--init-from", default=None, help="MMSelfSup/original DenseCL checkpoint to start from")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pre.add_argument("--allow-unsafe-pickle", action="store_true")

    ins = sub.add_parser("inspect", help="detect a checkpoint's format, architecture and fingerprint")
    ins.add_argument("ckpt")
    ins.add_argument("--arch", default=None)
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--allow-unsafe-pickle", action="store_true",
                     help="allow full unpickling (detectron2 .pkl, old pickles): runs code from the file")

    conv = sub.add_parser("convert", help="export the backbone for torchvision, detectron2 or mmdet/mmseg")
    conv.add_argument("ckpt")
    conv.add_argument("--to", required=True, choices=("torchvision", "detectron2", "mmdet"))
    conv.add_argument("--out", required=True)
    conv.add_argument("--arch", default=None)
    conv.add_argument("--allow-unsafe-pickle", action="store_true")

    ev = sub.add_parser("evaluate", help="run protocols on one checkpoint, one record per protocol")
    ev.add_argument("ckpt")
    ev.add_argument("--data-root", required=True)
    ev.add_argument("--protocols", default="all", help="all or a comma-separated list: " + ", ".join(PROTOCOLS))
    ev.add_argument("--preset", choices=("tiny", "paper"), default="paper")
    ev.add_argument("--out", default="results")
    ev.add_argument("--name", default=None, help="display name of the checkpoint in reports")
    ev.add_argument("--force", action="store_true", help="recompute cells that already have a record")
    seeds = ev.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=SEED, default=0, help="one evaluation seed (default 0)")
    seeds.add_argument("--seeds", type=seed_list, default=None, metavar="S1,S2,...",
                       help="run every protocol once per seed, one record each (e.g. 0,1,2)")
    ev.add_argument("--save-features", default=None, metavar="DIR")
    ev.add_argument("--arch", default=None)
    ev.add_argument("--set", action="append", default=[], metavar="PROTOCOL.KEY=VALUE",
                    help="override one protocol config field (recorded; the run is then not comparable)")
    ev.add_argument("--workers", type=bounded_int(0), default=None,
                    help="data-loading workers per process (default: up to 8 on GPU, 0 on CPU)")
    ev.add_argument("--allow-unsafe-pickle", action="store_true")

    rep = sub.add_parser("report", help="markdown/CSV/PNG report from result records")
    rep.add_argument("results_dir")
    rep.add_argument("--out", default=None, help="markdown file (default RESULTS_DIR/report.md)")
    rep.add_argument("--zoo", action="store_true", help="model-zoo table: one row per checkpoint")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    key = f"data {args.data_command}" if args.command == "data" else args.command
    retain_freed_memory()
    module_name, func_name = HANDLERS[key].split(":")
    try:
        for attribute, option, kind in OUTPUTS.get(key, ()):
            check_output(getattr(args, attribute), option, kind)
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except InputError as exc:
        print(f"densebench {key}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
