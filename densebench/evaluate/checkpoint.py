"""Checkpoint import: the only way evaluation obtains a backbone.

Users bring checkpoints from every self-supervised codebase. The classic failure is a backbone
that silently loads as random weights (a prefix mismatch reported only as a warning), so this
module is strict and explicit:

1. **Read safely** (`read_checkpoint`): `torch.load(weights_only=True)` for PyTorch files and
   `safetensors` for `.safetensors`. A file that needs full unpickling (an old pickle, a
   detectron2 `.pkl`, a checkpoint holding arbitrary Python objects) is refused, naming the
   file, unless the caller passes `allow_unsafe_pickle=True` (`--allow-unsafe-pickle`), because
   unpickling runs code stored in the file. `.pkl` files are never unpickled without the flag.
2. **Unwrap the container** (`unwrap_container`): VISSL `classy_state_dict -> base_model ->
   model -> trunk`, `{"state_dict": ...}` (MMSelfSup, MoCo, timm, Lightning, densebench),
   `{"model": ...}` (detectron2, DeiT-style), or a bare dict of tensors.
3. **Detect the key naming** (`KEY_FORMATS`, first signature that matches) and map every
   source key to a torchvision ResNet name, or mark it ignored (heads, necks, queues,
   momentum encoders, `fc.*`). Prefixes are removed as prefixes, never with `str.lstrip`.
4. **Infer the architecture** from shapes when not given (`infer_arch`): the torchvision
   ResNet whose backbone keys and shapes the mapped tensors match best.
5. **Check strictly**: every backbone tensor of that architecture must be present with the
   right shape; a missing, wrong-shape or unexpected backbone key is an `InputError` (CLI exit
   1) listing the keys and the closest format guess. One documented exception: a BatchNorm
   `num_batches_tracked` counter that the source format does not store (detectron2 FrozenBN,
   some converters) is filled with 0, the value torchvision initialises it to; it only
   matters for BN with `momentum=None`, which no protocol uses. Filled keys are reported.

Supported formats (the `format` field of `CheckpointInfo`), see `KEY_FORMATS`:
densebench (our pre-training), mmselfsup-0.x (also OpenSelfSup / the original DenseCL),
mmselfsup-1.x (also MMPreTrain self-supervised), moco-v1 / moco-v2 / moco-v3, solo-learn,
lightly, vissl, detectron2, mmdet/mmseg (`backbone.*` only), torchvision-dataparallel
(`module.*`), timm (a timm training checkpoint), extracted-backbone (`{"state_dict": ...}` or
`{"model": ...}` holding torchvision names, e.g. MMSelfSup's extract_backbone_weights output),
torchvision (bare dict; timm's ResNet naming is identical, so a bare timm resnet50 state dict is
reported as torchvision).

Lightly convention: lightly's examples build the backbone as
`nn.Sequential(*list(resnet.children())[:-1])`, so `backbone.0` = conv1, `backbone.1` = bn1,
`backbone.4..7` = layer1..4 (2, 3 and 8 are relu, maxpool, avgpool and hold no tensors).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import re
import struct
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision

from densebench.errors import InputError

# torchvision ResNet constructors the importer knows, most common first (ties in
# `infer_arch` go to the earlier one)
ARCHS = (
    "resnet50", "resnet18", "resnet34", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)
DEFAULT_ARCH = "resnet50"

# a torchvision ResNet backbone key (anything else is not part of the backbone namespace)
_BACKBONE_NAME = re.compile(r"^(conv1|bn1|layer\d+)\.")

REFUSE_UNSAFE = ("unpickling it can execute code stored in the file, so it is refused; "
                 "re-run with --allow-unsafe-pickle only if you trust where the file comes from")


@dataclass
class CheckpointInfo:
    """What was imported, from where and how: printed by `inspect`, stored in records."""

    path: str
    sha256: str
    format: str
    arch: str
    backbone_hash: str
    loaded: int = 0
    ignored: List[str] = field(default_factory=list)
    mapping_examples: List[Tuple[str, str]] = field(default_factory=list)
    container: str = ""          # where the tensors sat in the file, e.g. "state_dict"
    reader: str = ""             # how the file was read, e.g. "torch.load(weights_only=True)"
    arch_source: str = ""        # "given" or the shape evidence the arch was inferred from
    filled: List[str] = field(default_factory=list)   # num_batches_tracked filled with 0
    format_description: str = ""

    def record(self) -> dict:
        """The `checkpoint` field of a result record."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format,
                "arch": self.arch, "backbone_hash": self.backbone_hash}

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of named tensors: names, dtypes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        # byte view so every dtype (bfloat16 included) hashes; same bytes as tensor.numpy()
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# 1. reading the file safely


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < path.stat().st_size


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_reason(exc: Exception) -> str:
    """The informative line of torch's weights_only refusal (e.g. the disallowed global)."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason or "unsupported pickle content"
    return _first_line(exc)


def _is_zip(path: Path) -> bool:
    """torch.save's default format is a zip archive."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _is_pickle_stream(path: Path) -> bool:
    """Whether the file starts with one well-formed pickle (protocol 2+, as torch.save and Python 3
    write), found by parsing its opcodes with pickletools: nothing is executed. Tells a real
    pickle, which only full unpickling could read, from random or foreign bytes."""
    try:
        with open(path, "rb") as fh:
            if fh.read(1) != b"\x80":                       # the PROTO opcode
                return False
            fh.seek(0)
            for _ in pickletools.genops(fh):               # stops after the STOP opcode
                pass
        return True
    except Exception:  # pickletools raises ValueError and others for bytes that are no pickle
        return False


def _unsafe_pickle_load(path: Path):
    """Full unpickling, only ever reached with allow_unsafe_pickle=True."""
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")  # latin1: detectron2 / py2 pickles


def read_checkpoint(path: "str | Path", allow_unsafe_pickle: bool = False) -> Tuple[object, str]:
    """Load a checkpoint file without executing code from it; returns (object, how it was read)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not a checkpoint file")
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "checkpoint file is empty")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(path, f"not a readable safetensors file: {exc}") from None
    if path.suffix == ".pkl":
        if not allow_unsafe_pickle:
            raise InputError(path, "is a plain pickle (.pkl, e.g. a detectron2 checkpoint); " + REFUSE_UNSAFE)
        try:
            return _unsafe_pickle_load(path), "pickle.load (--allow-unsafe-pickle)"
        except Exception as exc:  # any unpickling failure is a bad file, reported as such
            raise InputError(path, f"not a readable pickle: {type(exc).__name__}: {exc}") from None
    if not _is_zip(path) and not _is_pickle_stream(path):
        raise InputError(path, "not a checkpoint (unrecognised format: neither a PyTorch file, a pickle "
                         "nor safetensors)")
    try:
        with warnings.catch_warnings():  # torch warns about protocol>2 pickles before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True), "torch.load(weights_only=True)"
    except pickle.UnpicklingError as exc:
        if not allow_unsafe_pickle:
            raise InputError(path, "needs full unpickling (torch.load(weights_only=True) refused it: "
                             f"{_weights_only_reason(exc)}); " + REFUSE_UNSAFE) from None
    except Exception as exc:  # corrupt/truncated/foreign file: torch raises many types for these
        raise InputError(path, f"not a readable PyTorch checkpoint: {_first_line(exc)}") from None
    # only with allow_unsafe_pickle from here on
    try:
        return (torch.load(path, map_location="cpu", weights_only=False),
                "torch.load(weights_only=False, --allow-unsafe-pickle)")
    except Exception:
        pass  # not a torch file at all (e.g. pickle.dump output): try a plain pickle
    try:
        return _unsafe_pickle_load(path), "pickle.load (--allow-unsafe-pickle)"
    except Exception as exc:
        raise InputError(path, f"not a readable checkpoint: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# 2. unwrapping the container


@dataclass
class Container:
    """The tensors of a checkpoint and what surrounded them."""

    tensors: Dict[str, object]            # name -> torch.Tensor or numpy array
    where: str                            # e.g. "state_dict", "classy_state_dict.base_model.model.trunk"
    top_keys: Tuple[str, ...] = ()        # keys of the top-level dict (format hints)
    extra_ignored: List[str] = field(default_factory=list)   # e.g. VISSL heads


def _is_array(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _tensor_items(mapping: Mapping) -> Dict[str, object]:
    return {str(k): v for k, v in mapping.items() if _is_array(v)}


def _vissl_trunk(obj: Mapping, path: Path) -> Container:
    node: object = obj
    trail = []
    for key in ("classy_state_dict", "base_model", "model"):
        if not isinstance(node, Mapping) or key not in node:
            raise InputError(path, f"VISSL checkpoint without {'.'.join(trail + [key])}")
        node = node[key]
        trail.append(key)
    if not isinstance(node, Mapping) or "trunk" not in node:
        raise InputError(path, "VISSL checkpoint without classy_state_dict.base_model.model.trunk")
    heads = node.get("heads", {}) if isinstance(node.get("heads", {}), Mapping) else {}
    return Container(tensors=_tensor_items(node["trunk"]), where="classy_state_dict.base_model.model.trunk",
                     top_keys=tuple(obj.keys()), extra_ignored=[f"heads.{k}" for k in _tensor_items(heads)])


def unwrap_container(obj: object, path: "str | Path") -> Container:
    """Find the dict of named tensors inside whatever the file held."""
    path = Path(path)
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (only with the unsafe flag)
        return Container(tensors=_tensor_items(obj.state_dict()), where="pickled nn.Module")
    if not isinstance(obj, Mapping):
        raise InputError(path, f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    top = tuple(str(k) for k in obj.keys())
    if "classy_state_dict" in obj:
        return _vissl_trunk(obj, path)
    author = obj.get("author", obj.get("__author__"))
    for key in ("state_dict", "model"):
        where = f"{key} (author: {author})" if isinstance(author, str) else key
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):  # e.g. {"model": <pickled module>} (unsafe flag only)
            return Container(tensors=_tensor_items(inner.state_dict()), where=f"{key} (pickled nn.Module)",
                             top_keys=top)
        if isinstance(inner, Mapping) and _tensor_items(inner):
            return Container(tensors=_tensor_items(inner), where=where, top_keys=top)
    tensors = _tensor_items(obj)
    if not tensors:
        raise InputError(path, f"no tensors found (top-level keys: {', '.join(top[:12]) or 'none'})")
    return Container(tensors=tensors, where="top level", top_keys=top)


# ---------------------------------------------------------------------------------------------
# 3. key formats: signature + renaming to torchvision names


def _strip(key: str, prefix: str) -> Optional[str]:
    """`key` without `prefix`, or None when it does not start with it (a prefix, not lstrip)."""
    return key[len(prefix):] if key.startswith(prefix) else None


def _prefix_rename(prefix: str) -> Callable[[str], Optional[str]]:
    return lambda key: _strip(key, prefix)


def _identity(key: str) -> Optional[str]:
    return key


_LIGHTLY_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _lightly_rename(key: str) -> Optional[str]:
    rest = _strip(key, "backbone.")
    if rest is None:
        return None
    index, _, tail = rest.partition(".")
    return f"{_LIGHTLY_INDEX[index]}.{tail}" if index in _LIGHTLY_INDEX and tail else None


_D2_STAGE = re.compile(r"^res(\d+)\.(\d+)\.(.+)$")
_D2_CONV_NORM = re.compile(r"^conv(\d+)\.norm\.(.+)$")


def _detectron2_body(key: str) -> Optional[str]:
    """Inverse of the PROTOCOLS.md 1.7 torchvision -> detectron2 renaming."""
    stem = _strip(key, "stem.")
    if stem is not None:
        norm = _strip(stem, "conv1.norm.")
        if norm is not None:
            return f"bn1.{norm}"
        return stem  # stem.conv1.weight -> conv1.weight; stem.fc.* -> fc.* (ignored)
    match = _D2_STAGE.match(key)
    if not match:
        return None
    stage, block, rest = int(match.group(1)), match.group(2), match.group(3)
    layer = f"layer{stage - 1}.{block}"
    norm = _D2_CONV_NORM.match(rest)
    if norm:
        return f"{layer}.bn{norm.group(1)}.{norm.group(2)}"
    short_norm = _strip(rest, "shortcut.norm.")
    if short_norm is not None:
        return f"{layer}.downsample.1.{short_norm}"
    short = _strip(rest, "shortcut.")
    if short is not None:
        return f"{layer}.downsample.0.{short}"
    return f"{layer}.{rest}"


def _detectron2_prefix(keys: Sequence[str]) -> Optional[str]:
    for prefix in ("", "backbone.bottom_up.", "backbone."):
        if f"{prefix}stem.conv1.weight" in keys:
            return prefix
    return None


def _detectron2_rename_for(keys: Sequence[str]) -> Callable[[str], Optional[str]]:
    prefix = _detectron2_prefix(keys) or ""

    def rename(key: str) -> Optional[str]:
        body = _strip(key, prefix)
        return None if body is None else _detectron2_body(body)
    return rename


def _any_prefix(keys: Sequence[str], *prefixes: str) -> bool:
    return any(k.startswith(p) for k in keys for p in prefixes)


def _torchvision_named(keys: Sequence[str]) -> bool:
    return "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys)


@dataclass(frozen=True)
class KeyFormat:
    """One checkpoint key layout: how to recognise it and how to rename its keys."""

    name: str
    description: str
    matches: Callable[[Sequence[str], Container], bool]
    # builds the renamer (some need the key list, e.g. detectron2's optional prefix)
    renamer: Callable[[Sequence[str]], Callable[[str], Optional[str]]]
    # source-key prefixes that may hold a second copy of the backbone (checked equal to it)
    duplicates: Tuple[str, ...] = ()


def _fixed(rename: Callable[[str], Optional[str]]) -> Callable[[Sequence[str]], Callable[[str], Optional[str]]]:
    return lambda keys: rename


def _mmselfsup0_renamer(keys: Sequence[str]) -> Callable[[str], Optional[str]]:
    # `backbone` is encoder_q[0] registered a second time (PROTOCOLS.md 1.7); use it when present
    return _prefix_rename("backbone." if _any_prefix(keys, "backbone.") else "encoder_q.0.")


KEY_FORMATS: Tuple[KeyFormat, ...] = (
    KeyFormat("densebench", "densebench pre-training checkpoint (backbone.*, backbone_k.*, neck*, queues)",
              lambda keys, c: "densebench" in c.top_keys, _fixed(_prefix_rename("backbone."))),
    KeyFormat("vissl", "VISSL (classy_state_dict -> base_model -> model -> trunk -> _feature_blocks.*)",
              lambda keys, c: c.where.startswith("classy_state_dict")
              or _any_prefix(keys, "_feature_blocks.", "trunk._feature_blocks."),
              # a whole VISSL model's state dict (trunk.* + heads.*) carries the `trunk.` prefix too
              lambda keys: _prefix_rename("trunk._feature_blocks." if _any_prefix(keys, "trunk._feature_blocks.")
                                          else "_feature_blocks.")),
    KeyFormat("detectron2", "detectron2 (stem.*, res2..res5.*, convK.norm, shortcut)",
              lambda keys, c: _detectron2_prefix(keys) is not None, _detectron2_rename_for),
    KeyFormat("mmselfsup-0.x", "MMSelfSup 0.x / OpenSelfSup / original DenseCL (encoder_q.0.*, backbone.*, queues)",
              lambda keys, c: _any_prefix(keys, "encoder_q.0."), _mmselfsup0_renamer,
              duplicates=("encoder_q.0.",)),
    KeyFormat("mmselfsup-1.x", "MMSelfSup 1.x / MMPreTrain (backbone.*, neck.*, encoder_k.module.*, queues)",
              lambda keys, c: _any_prefix(keys, "backbone.")
              and (_any_prefix(keys, "encoder_k.", "target_net.") or "queue" in keys),
              _fixed(_prefix_rename("backbone."))),
    KeyFormat("moco-v3", "MoCo v3 (module.base_encoder.*, module.momentum_encoder.*, module.predictor.*)",
              lambda keys, c: _any_prefix(keys, "module.base_encoder.", "base_encoder."),
              lambda keys: _prefix_rename("module.base_encoder." if _any_prefix(keys, "module.base_encoder.")
                                          else "base_encoder.")),
    KeyFormat("moco-v2", "MoCo v2 (module.encoder_q.* with an fc.0/fc.2 MLP head)",
              lambda keys, c: _any_prefix(keys, "module.encoder_q.fc.0.", "encoder_q.fc.0."),
              lambda keys: _prefix_rename("module.encoder_q." if _any_prefix(keys, "module.encoder_q.")
                                          else "encoder_q.")),
    KeyFormat("moco-v1", "MoCo v1 (module.encoder_q.*, linear fc head)",
              lambda keys, c: _any_prefix(keys, "module.encoder_q.", "encoder_q.conv1.", "encoder_q.layer"),
              lambda keys: _prefix_rename("module.encoder_q." if _any_prefix(keys, "module.encoder_q.")
                                          else "encoder_q.")),
    KeyFormat("lightly", "lightly (backbone = nn.Sequential(*resnet.children()[:-1]): backbone.0 = conv1, "
              "backbone.1 = bn1, backbone.4..7 = layer1..4)",
              lambda keys, c: "backbone.0.weight" in keys and _any_prefix(keys, "backbone.4."),
              _fixed(_lightly_rename)),
    KeyFormat("solo-learn", "solo-learn (backbone.*, projector.*, classifier.*, momentum_*)",
              lambda keys, c: _any_prefix(keys, "backbone.")
              and _any_prefix(keys, "projector.", "classifier.", "momentum_backbone."),
              _fixed(_prefix_rename("backbone."))),
    KeyFormat("mmdet/mmseg", "OpenMMLab backbone.* state_dict (MMDetection / MMSegmentation / MMPreTrain)",
              lambda keys, c: _any_prefix(keys, "backbone."), _fixed(_prefix_rename("backbone."))),
    KeyFormat("torchvision-dataparallel", "torchvision ResNet saved from DataParallel/DDP (module.*)",
              lambda keys, c: _any_prefix(keys, "module.conv1.", "module.layer1."), _fixed(_prefix_rename("module."))),
    KeyFormat("timm", "timm training checkpoint ({state_dict, arch, ...}; timm ResNet names = torchvision names)",
              lambda keys, c: c.where.startswith("state_dict") and _torchvision_named(keys) and "author" not in c.top_keys
              and ("state_dict_ema" in c.top_keys or {"arch", "version"} <= set(c.top_keys)),
              _fixed(_identity)),
    KeyFormat("extracted-backbone", "extracted backbone ({state_dict: ...} or {model: ...} in torchvision names, "
              "e.g. MMSelfSup extract_backbone_weights)",
              lambda keys, c: c.where.startswith(("state_dict", "model")) and _torchvision_named(keys),
              _fixed(_identity)),
    KeyFormat("torchvision", "torchvision ResNet state dict (bare; timm ResNets use the same names)",
              lambda keys, c: True, _fixed(_identity)),
)
FORMATS_BY_NAME = {fmt.name: fmt for fmt in KEY_FORMATS}


def detect_format(container: Container) -> KeyFormat:
    keys = list(container.tensors)
    for fmt in KEY_FORMATS:
        if fmt.matches(keys, container):
            return fmt
    return FORMATS_BY_NAME["torchvision"]  # unreachable: torchvision matches everything


# ---------------------------------------------------------------------------------------------
# 4. mapping, architecture inference and the strict check


@dataclass
class KeyMapping:
    """Result of renaming a container's keys with one format."""

    backbone: Dict[str, object]          # torchvision name -> tensor/array (backbone namespace only)
    sources: Dict[str, str]              # torchvision name -> source key
    ignored: List[str]                   # source keys that are not backbone tensors
    collisions: List[str]                # torchvision names produced by two source keys


def apply_format(fmt: KeyFormat, container: Container) -> KeyMapping:
    keys = list(container.tensors)
    rename = fmt.renamer(keys)
    result = KeyMapping({}, {}, list(container.extra_ignored), [])
    for key in keys:
        target = rename(key)
        if target is None or target.startswith("fc.") or not _BACKBONE_NAME.match(target):
            result.ignored.append(key)
            continue
        if target in result.backbone:
            result.collisions.append(target)
        result.backbone[target] = container.tensors[key]
        result.sources[target] = key
    return result


@lru_cache(maxsize=None)
def reference_shapes(arch: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Backbone keys of a torchvision ResNet (no fc) with shape and dtype; built on the meta device."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _shape(value) -> Tuple[int, ...]:
    return tuple(value.shape)


@dataclass
class ArchCheck:
    arch: str
    missing: List[str]
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]   # key, file shape, expected
    unexpected: List[str]
    fillable: List[str]                  # missing num_batches_tracked of present BNs

    @property
    def matched(self) -> int:
        return len(reference_shapes(self.arch)) - len(self.missing) - len(self.wrong_shape)

    @property
    def ok(self) -> bool:
        return not (set(self.missing) - set(self.fillable)) and not self.wrong_shape and not self.unexpected

    @property
    def score(self) -> int:
        return self.matched - len(self.missing) - len(self.wrong_shape) - len(self.unexpected)


def check_arch(backbone: Mapping[str, object], arch: str) -> ArchCheck:
    reference = reference_shapes(arch)
    missing = [k for k in reference if k not in backbone]
    wrong = [(k, _shape(backbone[k]), reference[k][0]) for k in reference
             if k in backbone and _shape(backbone[k]) != reference[k][0]]
    unexpected = [k for k in backbone if k not in reference]
    fillable = [k for k in missing if k.endswith(".num_batches_tracked")
                and k.replace("num_batches_tracked", "running_mean") in backbone]
    return ArchCheck(arch, missing, wrong, unexpected, fillable)


def infer_arch(backbone: Mapping[str, object]) -> ArchCheck:
    """The torchvision ResNet the mapped tensors fit best (exact fit when the file is complete)."""
    checks = [check_arch(backbone, arch) for arch in ARCHS]
    return max(checks, key=lambda c: (c.ok, c.score))  # max keeps the first (most common) on ties


def arch_evidence(backbone: Mapping[str, object]) -> str:
    """Human-readable shape evidence: block type, blocks per stage, layer1 width and groups."""
    bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.weight$", k) for k in backbone)
    depths = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in backbone for m in [re.match(rf"^layer{stage}\.(\d+)\.", k)] if m}
        depths.append(max(indices) + 1 if indices else 0)
    parts = [f"{'bottleneck' if bottleneck else 'basic'} blocks {depths}"]
    conv1 = backbone.get("layer1.0.conv1.weight")
    conv2 = backbone.get("layer1.0.conv2.weight")
    if conv1 is not None:
        parts.append(f"layer1 width {_shape(conv1)[0]}")
    if conv2 is not None and bottleneck and _shape(conv2)[1]:
        parts.append(f"groups {_shape(conv2)[0] // _shape(conv2)[1]}")
    return ", ".join(parts)


_FLOAT_SOURCES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(value) -> str:
    return str(value.dtype).replace("torch.", "")


def _check_dtype(path: Path, source: str, value, dtype: torch.dtype) -> None:
    """A float weight must come as a float (fp16/bf16/fp32/fp64), a counter as an integer: an
    int32 or bool weight is a broken export, not something to cast silently."""
    name = _dtype_name(value)
    ok = name in _FLOAT_SOURCES if dtype.is_floating_point else name.startswith(("int", "uint"))
    if not ok:
        wanted = "a float dtype (float16/bfloat16/float32/float64)" if dtype.is_floating_point else "an integer dtype"
        raise InputError(path, f"tensor {source} has dtype {name}, expected {wanted}")


def _check_finite(path: Path, source: str, tensor: torch.Tensor) -> None:
    """NaN or Inf anywhere in a weight or BN statistic makes every feature NaN or garbage."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise InputError(path, f"tensor {source} is not finite ({nan} NaN, {inf} Inf of {tensor.numel()} values)")


def _to_tensor(value, dtype: torch.dtype) -> torch.Tensor:
    # np.array(order="C") copies and keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    tensor = torch.from_numpy(np.array(value, order="C")) if isinstance(value, np.ndarray) else value
    # torchvision's dtypes: fp16/bf16 -> fp32 is exact; a (rare) float64 source is rounded to fp32
    return tensor.detach().to(dtype=dtype).contiguous()


def _list_keys(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _closest_guess(container: Container) -> Tuple[str, int, int, str]:
    """(format, matched tensors, reference size, arch) of the best-fitting format and arch."""
    keys = list(container.tensors)
    best, best_rank = None, None
    for fmt in KEY_FORMATS:
        backbone = apply_format(fmt, container).backbone
        check = infer_arch(backbone) if backbone else check_arch(backbone, DEFAULT_ARCH)
        rank = (check.matched, fmt.matches(keys, container))  # ties: a matching signature wins
        if best_rank is None or rank > best_rank:
            best, best_rank = (fmt.name, check.matched, len(reference_shapes(check.arch)), check.arch), rank
    return best


def _strict_error(path: Path, fmt: KeyFormat, check: ArchCheck, arch_given: bool,
                  container: Container) -> InputError:
    missing = [k for k in check.missing if k not in check.fillable]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} backbone keys: {_list_keys(missing)}")
    if check.wrong_shape:
        shown = [f"{k} (file {list(got)} vs {list(want)})" for k, got, want in check.wrong_shape[:8]]
        more = len(check.wrong_shape) - len(shown)
        problems.append(f"{len(check.wrong_shape)} wrong-shape keys: {', '.join(shown)}"
                        + (f", ... ({more} more)" if more > 0 else ""))
    if check.unexpected:
        problems.append(f"{len(check.unexpected)} unexpected backbone keys: {_list_keys(check.unexpected)}")
    guess, matched, total, guess_arch = _closest_guess(container)
    if matched:
        guess_note = f"closest format guess: {guess} ({matched}/{total} {guess_arch} tensors found)"
    else:
        guess_note = ("closest format guess: none, no known layout finds any ResNet backbone tensor "
                      f"(first keys: {_list_keys(list(container.tensors), 6)})")
    arch_note = "given" if arch_given else "closest by shapes; pass --arch to choose"
    return InputError(path, f"not a complete {check.arch} backbone ({arch_note}) in the {fmt.name} layout: "
                      + "; ".join(problems) + f". {guess_note}")


def _mapping_examples(mapping: KeyMapping, limit: int = 5) -> List[Tuple[str, str]]:
    weights = [n for n in mapping.sources if n.endswith(".weight")]
    wanted = ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.1.weight"]
    chosen = [n for n in wanted if n in mapping.sources]
    if weights and weights[-1] not in chosen:
        chosen.append(weights[-1])
    return [(mapping.sources[n], n) for n in chosen[:limit]]


def _check_duplicates(path: Path, fmt: KeyFormat, container: Container, mapping: KeyMapping) -> None:
    """MMSelfSup 0.x stores the backbone twice; the copies must agree or the file is ambiguous."""
    for prefix in fmt.duplicates:
        for target, source in mapping.sources.items():
            twin = prefix + target
            if twin in container.tensors and twin != source:
                a, b = (torch.as_tensor(container.tensors[k]) for k in (source, twin))
                if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                    raise InputError(path, f"{source} and its duplicate {twin} differ; "
                                     "cannot tell which backbone is meant")


def load_backbone_state_dict(path: "str | Path", arch: Optional[str] = None,
                             allow_unsafe_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], CheckpointInfo]:
    """Backbone tensors in torchvision ResNet naming (no `fc.*`), strictly checked.

    Raises InputError (naming the file) for unreadable/unsafe files, unknown layouts, any
    missing, wrong-shape or unexpected backbone tensor, a non-float weight (e.g. int32) and a
    NaN or Inf in any backbone tensor (named).
    """
    path = Path(path)
    if arch is not None and arch not in ARCHS:
        raise InputError(path, f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    obj, reader = read_checkpoint(path, allow_unsafe_pickle)
    container = unwrap_container(obj, path)
    fmt = detect_format(container)
    mapping = apply_format(fmt, container)
    if mapping.collisions:
        raise InputError(path, f"{fmt.name} layout maps several keys onto {_list_keys(mapping.collisions)}")
    if arch is not None:
        check = check_arch(mapping.backbone, arch)
    elif mapping.backbone:
        check = infer_arch(mapping.backbone)
    else:
        check = check_arch(mapping.backbone, DEFAULT_ARCH)
    if not check.ok:
        raise _strict_error(path, fmt, check, arch is not None, container)
    _check_duplicates(path, fmt, container, mapping)

    reference = reference_shapes(check.arch)
    state = {}
    for key, (_, dtype) in reference.items():
        if key in check.fillable:
            state[key] = torch.tensor(0, dtype=dtype)  # see module docstring, item 5
        else:
            source = mapping.sources[key]
            _check_dtype(path, source, mapping.backbone[key], dtype)
            state[key] = _to_tensor(mapping.backbone[key], dtype)
            _check_finite(path, source, state[key])
    info = CheckpointInfo(
        path=str(path), sha256=file_sha256(path), format=fmt.name, arch=check.arch,
        backbone_hash=tensors_hash(state), loaded=len(mapping.backbone), ignored=sorted(mapping.ignored),
        mapping_examples=_mapping_examples(mapping), container=container.where, reader=reader,
        arch_source="given" if arch is not None else f"inferred from shapes: {arch_evidence(mapping.backbone)}",
        filled=list(check.fillable), format_description=fmt.description,
    )
    return state, info


def build_backbone(path: "str | Path", arch: Optional[str] = None,
                   allow_unsafe_pickle: bool = False) -> Tuple[torch.nn.Module, CheckpointInfo]:
    """A torchvision ResNet with the checkpoint's weights loaded strictly; `fc` is Identity."""
    state, info = load_backbone_state_dict(path, arch, allow_unsafe_pickle)
    model = getattr(torchvision.models, info.arch)()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    return model, info


# ---------------------------------------------------------------------------------------------
# `densebench inspect`


def ignored_groups(ignored: Sequence[str]) -> Dict[str, int]:
    """Ignored keys counted by their leading module path, e.g. {"encoder_k.0": 320, "queue": 1}."""
    groups: Dict[str, int] = {}
    for key in ignored:
        parts = key.split(".")
        taken = parts[:1]
        # descend through wrapper levels ("module", Sequential indices), never into the leaf
        for part in parts[1:-1]:
            wrapper = taken[-1] == "module" or taken[-1].startswith("encoder_")
            if part == "module" or (wrapper and (part.isdigit() or len(taken) == 1)):
                taken.append(part)
            else:
                break
        group = ".".join(taken)
        groups[group] = groups.get(group, 0) + 1
    return groups


def inspect_report(info: CheckpointInfo) -> dict:
    """Everything `inspect` shows, as plain JSON-able data."""
    data = info.to_dict()
    data["mapping_examples"] = [list(pair) for pair in info.mapping_examples]
    data["ignored_count"] = len(info.ignored)
    data["ignored_groups"] = ignored_groups(info.ignored)
    data["record"] = info.record()
    return data


def format_inspect(info: CheckpointInfo) -> str:
    lines = [
        f"file:          {info.path}",
        f"read with:     {info.reader}",
        f"format:        {info.format}  ({info.format_description})",
        f"tensors in:    {info.container}",
        f"architecture:  {info.arch}  ({info.arch_source})",
        f"loaded:        {info.loaded} backbone tensors"
        + (f" (+{len(info.filled)} num_batches_tracked filled with 0)" if info.filled else ""),
        f"ignored:       {len(info.ignored)} keys",
    ]
    for group, count in sorted(ignored_groups(info.ignored).items()):
        lines.append(f"                 {group}{'.*' if count > 1 or group not in info.ignored else ''} ({count})")
    lines.append("mapping:")
    lines.extend(f"  {source} -> {target}" for source, target in info.mapping_examples)
    lines.append(f"sha256:        {info.sha256}")
    lines.append(f"backbone_hash: {info.backbone_hash}")
    return "\n".join(lines)


def inspect_main(args) -> int:
    """`densebench inspect CKPT [--arch A] [--json] [--allow-unsafe-pickle]`."""
    _, info = load_backbone_state_dict(args.ckpt, args.arch, args.allow_unsafe_pickle)
    if args.json:
        print(json.dumps(inspect_report(info), indent=2, sort_keys=True))
    else:
        print(format_inspect(info))
    return 0
