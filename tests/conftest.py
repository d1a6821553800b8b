"""Shared fixtures: the synthetic benchmark (generated once per session) and the real samples."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# real-format samples copied byte for byte from ../shared/realdata (provenance in its README.md)
REALDATA = Path(os.environ.get("DENSEBENCH_REALDATA", REPO_ROOT / "tests" / "data" / "realdata"))

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

# tests/peer/ runs only in .venv-peer through scripts/run_peer_tests.sh (which sets DENSEBENCH_PEER=1).
collect_ignore = [] if os.environ.get("DENSEBENCH_PEER") == "1" else ["peer"]


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real-format samples not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The tiny synthetic benchmark in every real layout, written once for the whole session."""
    from densebench.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, scale="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory) -> Path:
    """A seeded random-init ResNet-18 saved as a torchvision-format checkpoint (the run_all baseline)."""
    from densebench.evaluate.random_init import random_init_state_dict

    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(random_init_state_dict("resnet18", 0), path)
    return path
