"""DenseCL pre-training loop: `densebench pretrain` (PROTOCOLS.md 1.6), resumable to the step.

One process or many under torchrun (DDP, NCCL on GPU, gloo on CPU). Each step's global batch is
`batch_size` consecutive indices of that epoch's permutation (seeded by (seed, epoch)); rank r
takes the r-th contiguous slice. So the global batch of a step does not depend on the number of
processes, and a single process with ghost-BN groups of the per-rank size reproduces a multi-
process run (tests/test_pretrain_ddp.py). Each sample's augmentation is seeded by
(seed, epoch, index) and each step's shuffle-BN permutation by (seed, iteration): the data and
the permutation after a resume are exactly those of an uninterrupted run, with any number of
loader workers.

Work dir: `log.jsonl` (one JSON line per iteration: losses, the global branch's mean
query-positive, query-negative and query-query cosines, lr, pairs/s, data-wait fraction),
`epoch_NNNN.pth` / `iter_NNNNNNNN.pth` checkpoints (atomic), `latest` (the newest checkpoint's
file name, written after it), `config.json`, at the end `backbone.pth` ({"state_dict":
torchvision-named backbone}) and `loss_curve.png`.
"""
from __future__ import annotations

import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from densebench import distributed as dist_utils
from densebench.config import (Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Seed, config_dict, make_config,
                               parse_set_options)
from densebench.errors import InputError
from densebench.io import read_jsonl, torch_save_atomic, write_json_atomic, write_text_atomic
from densebench.pretrain.augment import AugmentConfig, two_views
from densebench.pretrain.model import ARCHS, DenseCL, cosine_lr
from densebench.pretrain.step import GraphedTrainStep, train_step

log = logging.getLogger(__name__)

CHECKPOINT_KIND = {"kind": "densecl_pretrain", "version": 1}
LOG_NAME = "log.jsonl"
# per-step values of the model's output written to the log (see model.similarity_stats)
LOGGED_STEP_VALUES = ("loss_global", "loss_dense", "cos_pos", "cos_neg", "cos_batch")
# the last fraction of a run whose mean query-query cosine decides the collapse warning, and
# the mean above which the global projections count as collapsed (one direction for all images)
COLLAPSE_TAIL, COLLAPSE_COS = 0.1, 0.95
LATEST_NAME = "latest"
# fields that may differ between a run and its resumption without changing the trajectory
RESUME_FREE_FIELDS = ("workers", "checkpoint_interval", "keep_epoch_interval", "compile", "cuda_graph")
# options of earlier versions, since removed, that a saved config may still carry: our own CPU
# conv weight gradients (they changed float rounding only, not what is computed). Resuming
# ignores them with a note.
RETIRED_FIELDS = ("fast_weight_grad", "winograd_weight_grad")


@dataclass
class PretrainConfig:
    """Defaults = the published DenseCL R-50 200-epoch run (PROTOCOLS.md 1.1-1.6)."""

    arch: Literal[ARCHS] = "resnet50"      # 1.1
    epochs: PositiveInt = 200              # 1.6
    batch_size: PositiveInt = 256          # global images per step (32/GPU x 8), drop_last, 1.6
    lr: float = 0.03                       # SGD, 1.6
    sgd_momentum: Fraction = 0.9
    weight_decay: float = 1e-4             # on all trainable params incl. BN and biases, 1.6
    min_lr: float = 0.0                    # cosine stepped per epoch to 0, 1.6
    feat_dim: PositiveInt = 128            # 1.1 neck out
    hid_dim: NonNegativeInt = 0            # neck hidden; 0 = backbone channels (2048 for R-50, 1.1)
    num_grid: Optional[PositiveInt] = None  # None: no pooling of the dense grid (7x7 at 224), 1.1
    queue_len: PositiveInt = 65536         # 1.3, must be divisible by batch_size
    ema_momentum: Fraction = 0.999         # key encoder, 1.1
    temperature: PositiveFloat = 0.2       # 1.1
    loss_lambda: Fraction = 0.5            # 1.1
    lambda_warmup: bool = False            # DenseCLHook (lambda=0 before start iters); off in the published runs, 1.4
    lambda_warmup_iters: NonNegativeInt = 1000  # DenseCLHook start_iters, 1.4
    image_size: PositiveInt = 224          # RandomResizedCrop output, 1.5
    # BN after the neck's hidden layers (MoCo v3 / SimCLR heads; DenseCL's neck has none). The
    # tiny preset turns it on: without it 200 steps collapse the global projections
    neck_bn: bool = False
    # Two-view augmentation strength (1.5); the tiny preset weakens it (presets/tiny.yaml says why)
    crop_scale_min: Fraction = 0.2         # RandomResizedCrop scale (min, 1)
    color_jitter_p: Fraction = 0.8
    grayscale_p: Fraction = 0.2
    blur_p: Fraction = 0.5
    # Images per BN batch inside one process; 32 = the reference's per-GPU BN (12.2). On 8 GPUs
    # x 32 this is plain BN; on one process with 256 it means 8 ghost-BN groups. 0 = BN over the
    # whole per-process batch (a recorded deviation when that is not 32).
    bn_group_size: NonNegativeInt = 32
    # Backbone conv init: fan_out = [0x]/[1x] (mmcv KaimingInit), the version whose runs produced
    # the published numbers (PROTOCOLS.md 0); fan_in = [DC]. 12.3
    init_style: Literal["fan_out", "fan_in"] = "fan_out"
    seed: Seed = 0
    bf16: Optional[bool] = None            # bf16 autocast; None: on with CUDA, off on CPU (reference: fp32)
    # channels_last activations and weights; None = on (CUDA and CPU). On the 2-core AMD EPYC CPU,
    # ResNet-50 batch 32: 224 px 13.1 vs 14.6 s/step NCHW, 96 px 2.76 vs 3.02 s; resnet18 64 px
    # (tiny preset) equal (0.42 s). oneDNN runs most convolutions faster in NHWC.
    channels_last: Optional[bool] = None
    # torch.compile of both encoders' backbone + neck (queue / shuffle / enqueue stay eager). Off by
    # default: on an H200 (ResNet-50, batch 64, bf16 + channels_last) it gave 36.4 vs 36.1 ms/step
    # after an 88 s warm-up, i.e. no gain. None = on with CUDA, off on CPU.
    compile: Optional[bool] = False
    # Replay each step from a CUDA graph (densebench.pretrain.step.GraphedTrainStep): same kernels,
    # launched at once. None = on with CUDA in a single process without compile (not under DDP).
    cuda_graph: Optional[bool] = None
    workers: NonNegativeInt = 8            # loader processes per rank
    checkpoint_interval: NonNegativeInt = 1000  # iterations between checkpoints (plus one at every epoch end)
    keep_epoch_interval: NonNegativeInt = 10  # epoch checkpoints kept every N epochs (reference interval, 1.6)


# --------------------------------------------------------------------------- data


class TwoViewDataset(Dataset):
    """Indexed by (epoch, index): decodes the image and returns its two augmented views."""

    def __init__(self, paths: Sequence[Path], augment: AugmentConfig, seed: int):
        self.paths = list(paths)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]):
        from densebench.data.image import load_image

        epoch, index = key
        img = load_image(self.paths[index])
        return two_views(img, self.augment, self.seed, epoch, index)


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
    return torch.randperm(num_samples, generator=generator)


class ResumableBatchSampler:
    """This rank's batches of (epoch, index) from iteration `start_iter` to the end of training.

    Epoch e's order is a permutation seeded by (seed, e) (DistributedSampler-like reshuffle);
    step s of the epoch uses positions [s*B, (s+1)*B) of it (drop_last), rank r the r-th of
    world_size contiguous slices.
    """

    def __init__(self, num_samples: int, batch_size: int, epochs: int, seed: int,
                 start_iter: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.epochs, self.seed = num_samples, batch_size, epochs, seed
        self.start_iter, self.rank, self.world_size = start_iter, rank, world_size
        self.steps_per_epoch = num_samples // batch_size
        self.per_rank = batch_size // world_size

    def __len__(self) -> int:
        return self.epochs * self.steps_per_epoch - self.start_iter

    def __iter__(self):
        for iteration in range(self.start_iter, self.epochs * self.steps_per_epoch):
            epoch, step = divmod(iteration, self.steps_per_epoch)
            if step == 0 or iteration == self.start_iter:
                order = epoch_permutation(self.seed, epoch, self.num_samples)
            start = step * self.batch_size + self.rank * self.per_rank
            yield [(epoch, int(i)) for i in order[start:start + self.per_rank]]

    def state(self) -> dict:
        return {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "steps_per_epoch": self.steps_per_epoch}


def shuffle_permutation(seed: int, iteration: int, global_batch: int) -> torch.Tensor:
    """The shuffle-BN permutation of one step (generated here, broadcast from rank 0 in DDP)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, iteration, 2]).generate_state(1)[0]))
    return torch.randperm(global_batch, generator=generator)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """All global RNG states as tensors / lists / ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoints


def build_model(cfg: PretrainConfig) -> DenseCL:
    return DenseCL(arch=cfg.arch, feat_dim=cfg.feat_dim, hid_dim=cfg.hid_dim, queue_len=cfg.queue_len,
                   momentum=cfg.ema_momentum, temperature=cfg.temperature, num_grid=cfg.num_grid,
                   init_style=cfg.init_style, neck_norm=cfg.neck_bn)


def initial_backbone_state(cfg: PretrainConfig) -> Dict[str, torch.Tensor]:
    """The query backbone's weights at iteration 0 of a run with `cfg`, torchvision key names.

    `train` seeds and then builds the model, so the same two calls give its exact starting point:
    run_all.sh's random-init baseline (the same network minus the pre-training) and the reference
    of benchmarks/pretrain_drift.py."""
    seed_everything(cfg.seed)
    return extract_backbone(build_model(cfg).state_dict())


def build_optimizer(model: DenseCL, cfg: PretrainConfig) -> torch.optim.SGD:
    """SGD over every trainable (query) parameter, WD on all of them (PROTOCOLS.md 1.6)."""
    return torch.optim.SGD(model.query_parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum,
                           weight_decay=cfg.weight_decay)


def checkpoint_dict(model: DenseCL, optimizer, cfg: PretrainConfig, iteration: int,
                    steps_per_epoch: int, sampler_state: dict, extra: dict) -> dict:
    epoch, step = divmod(iteration, steps_per_epoch)
    return {
        "densebench": dict(CHECKPOINT_KIND),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": {"kind": "cosine_per_epoch", "epoch": epoch, "lr": optimizer.param_groups[0]["lr"]},
        "epoch": epoch,                     # completed epochs
        "iteration": iteration,             # completed iterations
        "sampler": dict(sampler_state, epoch=epoch, step=step),
        "rng": rng_state(),
        "config": config_dict(cfg),
        "arch": cfg.arch,
        "world_size": dist_utils.world_size(),
        **extra,
    }


def checkpoint_name(iteration: int, steps_per_epoch: int) -> str:
    if iteration % steps_per_epoch == 0:
        return f"epoch_{iteration // steps_per_epoch:04d}.pth"
    return f"iter_{iteration:08d}.pth"


def save_checkpoint(work_dir: Path, ckpt: dict, name: str, keep_epoch_interval: int) -> Path:
    """Write the checkpoint atomically, then point `latest` at it, then drop the previous one."""
    previous = read_latest(work_dir, must_exist=False)
    path = work_dir / name
    torch_save_atomic(ckpt, path)
    write_text_atomic(work_dir / LATEST_NAME, name + "\n")
    if previous is not None and previous != path and previous.exists():
        kept_epoch = previous.name.startswith("epoch_") and keep_epoch_interval > 0 and \
            int(previous.stem.split("_")[1]) % keep_epoch_interval == 0
        if not kept_epoch:
            previous.unlink()
    return path


def read_latest(work_dir: Path, must_exist: bool = True) -> Optional[Path]:
    pointer = work_dir / LATEST_NAME
    if not pointer.is_file():
        if must_exist:
            raise InputError(pointer, "no checkpoint to resume from (the `latest` pointer is missing)")
        return None
    path = work_dir / pointer.read_text().strip()
    if must_exist and not path.is_file():
        raise InputError(pointer, f"points to {path.name}, which does not exist")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file
        raise InputError(path, f"cannot load checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("densebench", {}).get("kind") != CHECKPOINT_KIND["kind"]:
        raise InputError(path, "not a densebench pre-training checkpoint")
    return ckpt


def check_resume_config(path: Path, saved: dict, current: dict) -> None:
    retired = sorted(k for k in saved if k in RETIRED_FIELDS)
    if retired:
        log.info("%s: ignoring %s, option(s) of an earlier densebench version that no longer exist",
                 path, ", ".join(f"{k}={saved[k]!r}" for k in retired))
        saved = {k: v for k, v in saved.items() if k not in RETIRED_FIELDS}
    # an option added after the run started: the run had its default behaviour (in the saved
    # dict's own form, config_dict's, so a tuple default compares equal to its JSON list)
    saved = {**config_dict(PretrainConfig()), **saved}
    different = sorted(k for k in set(saved) | set(current)
                       if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k))
    if different:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in different)
        raise InputError(path, f"config differs from the checkpoint's ({detail})")


def extract_backbone(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Query-backbone tensors in torchvision naming (keys under `backbone.`, prefix removed)."""
    prefix = "backbone."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


# --------------------------------------------------------------------------- log


def truncate_log(log_path: Path, iteration: int) -> None:
    """Keep only the records up to `iteration` (a resumed run rewrites what followed).

    A process killed while appending leaves a partial last line: `read_jsonl` drops it with a
    note (its iteration is past the checkpoint anyway). An unreadable line elsewhere is damage
    we cannot explain, so it stops the resume naming the line.
    """
    if not log_path.is_file():
        return
    try:
        entries = read_jsonl(log_path)
        kept = [line for line, entry in entries if int(entry["iteration"]) <= iteration]
    except (InputError, ValueError, TypeError, KeyError) as exc:
        detail = exc.problem if isinstance(exc, InputError) else "a record without an integer iteration"
        raise InputError(log_path, f"{detail}; fix or delete the file to resume") from None
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def read_log(log_path: Path) -> List[dict]:
    return [entry for _, entry in read_jsonl(log_path)]


def collapse_cosine(records: List[dict]) -> Optional[float]:
    """Mean query-query cosine over the last COLLAPSE_TAIL of the logged steps (None: not logged)."""
    values = [r["cos_batch"] for r in records if isinstance(r.get("cos_batch"), (int, float))]
    if not values:
        return None
    tail = values[-max(1, int(len(values) * COLLAPSE_TAIL)):]
    return float(np.mean(tail))


def warn_if_collapsed(records: List[dict]) -> None:
    cosine = collapse_cosine(records)
    if cosine is not None and cosine > COLLAPSE_COS:
        log.warning("the global projections have collapsed: mean cosine between the images of a batch "
                    "is %.3f over the last %d%% of the steps (above %.2f), so the loss measured the key "
                    "encoder's drift, not instance discrimination; see cos_pos/cos_neg in the log",
                    cosine, round(100 * COLLAPSE_TAIL), COLLAPSE_COS)


def plot_loss_curve(records: List[dict], out_path: Path) -> None:
    """Losses (left) and, when logged, the global branch's mean cosines (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [r["iteration"] for r in records]
    # (y label, title, legend font size, (logged key, legend label) per line)
    panels = [("loss", "DenseCL pre-training", None,
               (("loss", "total"), ("loss_global", "global"), ("loss_dense", "dense")))]
    if all("cos_batch" in r for r in records):
        panels.append(("mean cosine (global branch)", "", 8,
                       (("cos_pos", "query-positive"), ("cos_neg", "query-queue"),
                        ("cos_batch", "query-query (collapse if near 1)"))))
    fig, axes = plt.subplots(1, len(panels), figsize=(11 if len(panels) == 2 else 7, 4), squeeze=False)
    for ax, (ylabel, title, fontsize, lines) in zip(axes[0], panels):
        for key, label in lines:
            ax.plot(iterations, [r[key] for r in records], label=label, linewidth=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=fontsize)
    fig.tight_layout()
    from densebench.io import atomic_path

    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


def resolve_device_flags(cfg: PretrainConfig, device: torch.device) -> Tuple[bool, bool]:
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if cfg.bf16 is None else bool(cfg.bf16)
    channels_last = True if cfg.channels_last is None else bool(cfg.channels_last)
    return bf16, channels_last


def resolve_compile(cfg: PretrainConfig, device: torch.device) -> bool:
    """`compile` None means on with CUDA, off on CPU (inductor's CPU build is slow to warm up)."""
    return device.type == "cuda" if cfg.compile is None else bool(cfg.compile)


def resolve_cuda_graph(cfg: PretrainConfig, device: torch.device, use_compile: bool) -> bool:
    """`cuda_graph` None means on where it applies: CUDA, one process, no torch.compile."""
    applies = device.type == "cuda" and not dist_utils.is_dist() and not use_compile
    if cfg.cuda_graph and not applies:
        raise InputError(None, "cuda_graph=true needs a CUDA device, a single process (no torchrun) "
                               "and compile=false")
    return applies if cfg.cuda_graph is None else bool(cfg.cuda_graph)


def check_sizes(cfg: PretrainConfig, num_samples: int, data_hint: Optional[Path]) -> Tuple[int, int]:
    """(per-rank batch, ghost-BN groups per process); the sizes must divide evenly."""
    world = dist_utils.world_size()
    if cfg.batch_size % world:
        raise InputError(None, f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.queue_len % cfg.batch_size:
        raise InputError(None, f"queue_len {cfg.queue_len} must be divisible by batch_size {cfg.batch_size}")
    per_rank = cfg.batch_size // world
    group = cfg.bn_group_size or per_rank
    if per_rank % group:
        raise InputError(None, f"per-process batch {per_rank} is not divisible by bn_group_size {group}")
    if num_samples < cfg.batch_size:
        raise InputError(data_hint, f"{num_samples} training images, fewer than one batch of {cfg.batch_size}")
    return per_rank, per_rank // group


def train(cfg: PretrainConfig, image_paths: Sequence[Path], work_dir: "str | Path", *,
          resume: bool = False, init_from: Optional[str] = None, allow_unsafe_pickle: bool = False,
          device: Optional[torch.device] = None, preset_label: str = "custom",
          stop_after_iters: Optional[int] = None, show_progress: bool = True,
          data_hint: Optional[Path] = None) -> Path:
    """Pre-train; returns the newest checkpoint. `stop_after_iters` ends the run early (tests)."""
    work_dir = Path(work_dir)
    device = device or torch.device("cpu")
    per_rank, ghost_groups = check_sizes(cfg, len(image_paths), data_hint)
    steps_per_epoch = len(image_paths) // cfg.batch_size
    total_iters = cfg.epochs * steps_per_epoch
    bf16, channels_last = resolve_device_flags(cfg, device)
    use_compile = resolve_compile(cfg, device)
    use_cuda_graph = resolve_cuda_graph(cfg, device, use_compile)
    main_process = dist_utils.is_main()

    seed_everything(cfg.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    start_iter, extra = 0, {}
    if resume:
        ckpt_path = read_latest(work_dir)
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(ckpt_path, ckpt["config"], config_dict(cfg))
        if ckpt["sampler"]["num_samples"] != len(image_paths):
            raise InputError(ckpt_path, f"was trained on {ckpt['sampler']['num_samples']} images, "
                                        f"the data now has {len(image_paths)}")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = int(ckpt["iteration"])
        extra = {k: ckpt[k] for k in ("init_from",) if k in ckpt}
        set_rng_state(ckpt["rng"])
        log.info("resuming from %s at iteration %d", ckpt_path, start_iter)
    else:
        if read_latest(work_dir, must_exist=False) is not None:
            raise InputError(work_dir, "already holds a run (a `latest` checkpoint); use --resume or another --work-dir")
        if init_from is not None:
            from densebench.pretrain.mmselfsup_import import load_densecl_checkpoint

            state, start_epoch, source = load_densecl_checkpoint(init_from, model, allow_unsafe_pickle)
            model.load_state_dict(state)
            start_iter = min(start_epoch, cfg.epochs) * steps_per_epoch
            extra = {"init_from": source}
    if main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work_dir / "config.json", {
            "config": config_dict(cfg), "preset": preset_label, "world_size": dist_utils.world_size(),
            "per_rank_batch": per_rank, "ghost_bn_groups_per_process": ghost_groups,
            "bf16": bf16, "channels_last": channels_last, "compile": use_compile, "cuda_graph": use_cuda_graph,
            "device": dist_utils.device_description(device),
            "num_images": len(image_paths), "steps_per_epoch": steps_per_epoch, "total_iters": total_iters,
            **extra})
        truncate_log(work_dir / LOG_NAME, start_iter) if resume else (work_dir / LOG_NAME).unlink(missing_ok=True)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist_utils.is_dist():
        # broadcast_buffers=False as the reference's MMDistributedDataParallel: each rank keeps
        # its own BN running statistics, rank 0's are saved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation note says to keep it
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        net = model
    if use_compile:
        # in place on the encoder submodules, after DDP wrapping: DDP's forward and the
        # collectives / queue logic stay eager; the state dict keeps its names
        model.compile_encoders()
    net.train()
    run_step = GraphedTrainStep(model, optimizer, bf16) if use_cuda_graph else (
        lambda *inputs: train_step(net, optimizer, *inputs, bf16))

    sampler = ResumableBatchSampler(len(image_paths), cfg.batch_size, cfg.epochs, cfg.seed, start_iter,
                                    dist_utils.rank(), dist_utils.world_size())
    augment = AugmentConfig(size=cfg.image_size, scale=(cfg.crop_scale_min, 1.0), jitter_p=cfg.color_jitter_p,
                            grayscale_p=cfg.grayscale_p, blur_p=cfg.blur_p)
    dataset = TwoViewDataset(image_paths, augment, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None)

    from tqdm import tqdm

    progress = tqdm(total=total_iters, initial=start_iter, disable=not (show_progress and main_process),
                    desc="pretrain", dynamic_ncols=True)
    log_file = open(work_dir / LOG_NAME, "a") if main_process else None
    latest = read_latest(work_dir, must_exist=False) if resume else None
    iteration = start_iter
    tick = time.perf_counter()
    try:
        for im_q, im_k in loader:
            data_ready = time.perf_counter()
            epoch = iteration // steps_per_epoch
            lr = cosine_lr(cfg.lr, epoch, cfg.epochs, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_lambda = 0.0 if cfg.lambda_warmup and iteration < cfg.lambda_warmup_iters else cfg.loss_lambda
            im_q = im_q.to(device, non_blocking=True)
            im_k = im_k.to(device, non_blocking=True)
            if channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            perm = shuffle_permutation(cfg.seed, iteration, cfg.batch_size)
            out = run_step(im_q, im_k, perm, loss_lambda, ghost_groups)
            iteration += 1

            logged = torch.stack([out[key] for key in LOGGED_STEP_VALUES]).float()
            if dist_utils.is_dist():  # means over the ranks (cos_batch: within each rank's batch)
                torch.distributed.all_reduce(logged)
                logged /= dist_utils.world_size()
            values = dict(zip(LOGGED_STEP_VALUES, (float(v) for v in logged.cpu())))
            done = time.perf_counter()
            step_time = done - tick
            record = {"iteration": iteration, "epoch": epoch,
                      "loss": (1.0 - loss_lambda) * values["loss_global"] + loss_lambda * values["loss_dense"],
                      **values, "loss_lambda": loss_lambda,
                      "lr": lr, "pairs_per_s": cfg.batch_size / step_time,
                      "data_wait_frac": (data_ready - tick) / step_time}
            tick = done
            if main_process:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.3f}", pairs_s=f"{record['pairs_per_s']:.0f}")
            at_epoch_end = iteration % steps_per_epoch == 0
            if at_epoch_end or (cfg.checkpoint_interval and iteration % cfg.checkpoint_interval == 0):
                if main_process:
                    ckpt = checkpoint_dict(model, optimizer, cfg, iteration, steps_per_epoch,
                                           sampler.state(), extra)
                    latest = save_checkpoint(work_dir, ckpt, checkpoint_name(iteration, steps_per_epoch),
                                             cfg.keep_epoch_interval)
                dist_utils.barrier()
            if stop_after_iters is not None and iteration >= stop_after_iters:
                return latest
            tick = time.perf_counter()
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()

    if main_process:
        torch_save_atomic({"state_dict": extract_backbone(model.state_dict()), "author": "densebench",
                           "arch": cfg.arch, "iteration": iteration}, work_dir / "backbone.pth")
        records = read_log(work_dir / LOG_NAME)
        if records:
            plot_loss_curve(records, work_dir / "loss_curve.png")
            warn_if_collapsed(records)
    dist_utils.barrier()
    return read_latest(work_dir, must_exist=False) if main_process else latest


# --------------------------------------------------------------------------- CLI


def read_training_images(data: "str | Path") -> List[Path]:
    """Image paths of an ImageNet-style folder (train/<wnid>/* or meta/train.txt); labels unused."""
    from densebench.data.imagenet import read_imagenet

    root = Path(data)
    if not root.is_dir():
        raise InputError(root, "data folder not found")
    return [path for path, _ in read_imagenet(root, "train")]


def pretrain_config(preset: str, overrides: Dict[str, object], arch: Optional[str] = None) -> Tuple[PretrainConfig, str]:
    """The config (and preset label) of `densebench pretrain --preset P [--arch A] [--set ...]`."""
    if arch:
        if arch not in ARCHS:
            raise InputError(None, f"unknown --arch {arch!r}; pre-training knows {', '.join(ARCHS)}")
        overrides = {**overrides, "arch": arch}
    return make_config(PretrainConfig, "pretrain", preset, overrides)


def main(args) -> int:
    cfg, label = pretrain_config(args.preset, parse_set_options(args.set), args.arch)
    device = dist_utils.init_distributed()
    images = read_training_images(args.data)
    last = train(cfg, images, args.work_dir, resume=args.resume, init_from=args.init_from,
                 allow_unsafe_pickle=args.allow_unsafe_pickle, device=device, preset_label=label,
                 data_hint=Path(args.data))
    if dist_utils.is_main():
        print(f"densebench pretrain: done; checkpoint {last}; backbone {Path(args.work_dir) / 'backbone.pth'}")
    return 0
