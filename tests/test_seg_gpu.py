"""GPU-only checks of the segmentation protocols (skipped without CUDA; CI has none):
OpenCV parity of the pipeline primitives, an AMP training step and sliding-window inference of
the full-size ResNet-50 FCN-D8, both tiny protocols on the GPU, and the torchrun/DDP/SyncBN path.
Run: python -m pytest tests/test_seg_gpu.py -q -s"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from densebench.protocols import seg_cityscapes_fcn, seg_voc12aug_fcn, segmentation

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def seg_synth(request) -> Path:
    """The synthetic data: a pre-generated copy (DENSEBENCH_SEG_SYNTH) on machines without pycocotools."""
    given = os.environ.get("DENSEBENCH_SEG_SYNTH")
    return Path(given).resolve() if given else request.getfixturevalue("synth_root")


def test_pipeline_primitives_match_opencv():
    """Bit-exact (tests/peer/test_peer_seg_pipeline.py checks many more sizes and every colour)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(61, 83, 3)).astype(np.uint8)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    assert np.array_equal(segmentation.rgb_to_hsv_opencv(image), hsv)
    assert np.array_equal(segmentation.hsv_opencv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    ref_resized = cv2.resize(image, (40, 97), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(segmentation.resize_image(image, (97, 40)), ref_resized)
    label = rng.integers(0, 21, size=(61, 83)).astype(np.uint8)
    for size in [(97, 40), (30, 170)]:
        ref_label = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(segmentation.resize_label(label, size), ref_label)


@cuda
def test_r50_amp_train_step_and_slide_inference():
    device = torch.device("cuda")
    cfg = seg_cityscapes_fcn.Config()
    model = segmentation.FCNSegmentor(segmentation.build_dilated_resnet("resnet50"), 19, align_corners=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    images = torch.randn(2, 3, 769, 769, device=device)
    labels = torch.randint(0, 19, (2, 769, 769), device=device)
    labels[:, :50] = 255
    for step in range(4):
        torch.cuda.synchronize()
        tic = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(images)
        loss = segmentation.fcn_loss(out, labels, cfg)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        print(f"r50-d8 769x769 batch 2 AMP step {step}: {time.perf_counter() - tic:.3f}s loss {loss.item():.3f}")
        assert torch.isfinite(loss)
    print("peak memory GiB:", torch.cuda.max_memory_allocated() / 2 ** 30)
    model.eval()
    image = torch.randn(1, 3, 1025, 2049, device=device)

    def encode(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            return model.encode_decode(x)

    torch.cuda.synchronize()
    tic = time.perf_counter()
    pred = segmentation.predict(encode, image, (1024, 2048), 19, "slide", True, (769, 769), (513, 513))
    torch.cuda.synchronize()
    print(f"slide inference 1025x2049 -> 1024x2048: {time.perf_counter() - tic:.3f}s")
    assert pred.shape == (1024, 2048) and pred.max() < 19


def _checkpoint(tmp_path: Path, arch: str) -> Path:
    path = tmp_path / f"{arch}.pth"
    torch.save(getattr(torchvision.models, arch)().state_dict(), path)
    return path


@cuda
@pytest.mark.parametrize("module", [seg_voc12aug_fcn, seg_cityscapes_fcn])
def test_tiny_protocols_on_gpu_with_resnet50(module, seg_synth, tmp_path):
    from densebench.config import make_config
    from densebench.evaluate.context import RunContext

    # amp on (not the default): this test exercises the float16 autocast path
    cfg, _ = make_config(module.Config, module.NAME, "tiny", {"head_channels": 512, "aux_channels": 256, "amp": True})
    ctx = RunContext(checkpoint=_checkpoint(tmp_path, "resnet50"), data_root=seg_synth, work_dir=tmp_path / "w",
                     cache_dir=tmp_path / "c", device=torch.device("cuda"), arch="resnet50", show_progress=False)
    tic = time.perf_counter()
    out = module.run(ctx, cfg)
    print(module.NAME, f"{time.perf_counter() - tic:.1f}s", out.metrics, out.extra["amp"])
    assert out.extra["amp"] is True and out.metrics["iteration"] == cfg.iterations
    assert out.metrics["mIoU"] is not None


@cuda
def test_torchrun_ddp_syncbn(seg_synth, tmp_path):
    ckpt = _checkpoint(tmp_path, "resnet18")
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "densebench", "evaluate",
           str(ckpt), "--data-root", str(seg_synth), "--protocols", "seg_cityscapes_fcn", "--preset", "tiny",
           "--arch", "resnet18", "--out", str(out), "--set", "seg_cityscapes_fcn.iterations=6",
           "--set", "seg_cityscapes_fcn.eval_interval=3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print(done.stdout[-2000:], done.stderr[-3000:])
    assert done.returncode == 0
    record = json.loads(next((out / "records").rglob("*.json")).read_text())
    assert record["extra"]["sync_bn"] is True and record["world_size"] == 1
    assert [h["iteration"] for h in record["extra"]["history"]] == [3, 6]
