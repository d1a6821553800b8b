"""Import a full MMSelfSup / original DenseCL checkpoint into our DenseCL model (PROTOCOLS.md 1.7).

Layouts (state_dict keys, the file may wrap them in {"state_dict": ..., "meta": ...}):
- [DC] / [0x]: `encoder_q.0.*` (backbone), `encoder_q.1.*` (neck), `encoder_k.0.*`,
  `encoder_k.1.*`, `backbone.*` (the same module as encoder_q.0, registered twice), `queue`,
  `queue_ptr`, `queue2`, `queue2_ptr`.
- [1x]: `backbone.*`, `neck.*`, `encoder_k.module.0.*`, `encoder_k.module.1.*`,
  `encoder_k.steps`, the four queue tensors.
Backbone naming (conv1, bn1, layerX.Y.convZ/bnZ, downsample.{0,1}) and neck naming
(mlp.0/2, mlp2.0/2) are the same as ours, so only the encoder prefixes change. The import is
strict: every tensor of our model must be found with the same shape, and no tensor of the
file may be left unused (except `encoder_k.steps` and the duplicate `backbone.*` of [0x],
which must equal `encoder_q.0.*`), otherwise InputError lists what is wrong.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from densebench.errors import InputError
from densebench.evaluate.checkpoint import read_checkpoint

# (source prefix, our prefix); the longest matching source prefix wins
LAYOUT_0X = (("encoder_q.0.", "backbone."), ("encoder_q.1.", "neck."),
             ("encoder_k.0.", "backbone_k."), ("encoder_k.1.", "neck_k."))
LAYOUT_1X = (("backbone.", "backbone."), ("neck.", "neck."),
             ("encoder_k.module.0.", "backbone_k."), ("encoder_k.module.1.", "neck_k."))
QUEUE_KEYS = ("queue", "queue_ptr", "queue2", "queue2_ptr")


def detect_layout(state: Dict[str, torch.Tensor]) -> str:
    if any(k.startswith("encoder_q.0.") for k in state):
        return "mmselfsup0x"
    if any(k.startswith("encoder_k.module.") for k in state):
        return "mmselfsup1x"
    return "unknown"


def rename_state(state: Dict[str, torch.Tensor], layout: str, path: Path) -> Dict[str, torch.Tensor]:
    """Our key names for every tensor of the file; leftovers make the import fail."""
    rules = LAYOUT_0X if layout == "mmselfsup0x" else LAYOUT_1X
    renamed, leftovers = {}, []
    for key, value in state.items():
        if key in QUEUE_KEYS:
            renamed[key] = value
            continue
        if layout == "mmselfsup1x" and key == "encoder_k.steps":
            continue
        if layout == "mmselfsup0x" and key.startswith("backbone."):
            twin = "encoder_q.0." + key[len("backbone."):]
            if twin not in state or not torch.equal(state[twin], value):
                raise InputError(path, f"{key} differs from (or lacks) its twin {twin}")
            continue
        for source, target in rules:
            if key.startswith(source):
                renamed[target + key[len(source):]] = value
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise InputError(path, f"unexpected keys for a DenseCL {layout} checkpoint: {leftovers[:10]}")
    return renamed


def load_densecl_checkpoint(path: "str | Path", model: torch.nn.Module,
                            allow_unsafe_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], int, dict]:
    """(state dict for `model`, completed epochs from the file's meta or 0, source description)."""
    path = Path(path)
    obj, _ = read_checkpoint(path, allow_unsafe_pickle)      # the safe reader inspect/evaluate use
    if not isinstance(obj, dict):
        raise InputError(path, "not a checkpoint dict")
    state = obj.get("state_dict", obj)
    layout = detect_layout(state)
    if layout == "unknown":
        raise InputError(path, "not an MMSelfSup/original DenseCL checkpoint (no encoder_q.0.* or encoder_k.module.* keys)")
    renamed = rename_state(state, layout, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(path, f"{len(missing)} tensors of the DenseCL model missing, e.g. {missing[:10]}")
    unexpected = [k for k in renamed if k not in expected]
    if unexpected:
        raise InputError(path, f"tensors the model does not have (another arch or neck?): {unexpected[:10]}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in renamed.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise InputError(path, f"shape mismatch (check --arch, queue_len, feat_dim): {wrong[:5]}")
    out = {k: renamed.get(k, expected[k]).to(expected[k].dtype).clone() for k in expected}
    return out, completed_epochs(obj), {"path": str(path), "layout": layout, "epochs": completed_epochs(obj)}


def completed_epochs(obj: dict) -> int:
    meta: Optional[dict] = obj.get("meta") if isinstance(obj.get("meta"), dict) else None
    epoch = meta.get("epoch") if meta else None
    return int(epoch) if isinstance(epoch, int) and epoch >= 0 else 0
