"""Both segmentation protocols train at tiny scale on the synthetic VOC12-Aug and Cityscapes data;
the record holds mIoU, aAcc and per-class IoU; an interrupted run resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densebench.config import make_config
from densebench.evaluate.context import RunContext
from densebench.protocols import seg_cityscapes_fcn, seg_voc12aug_fcn, segmentation

pytestmark = pytest.mark.slow


def _context(ckpt: Path, root: Path, work: Path) -> RunContext:
    return RunContext(checkpoint=ckpt, data_root=root, work_dir=work, cache_dir=work / "cache",
                      arch="resnet18", show_progress=False)


def _check_output(metrics, extra, class_names, iterations):
    assert set(metrics) == {"mIoU", "aAcc", "iteration"}
    assert metrics["iteration"] == iterations
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 < metrics["aAcc"] <= 100.0
    iou = extra["per_class_IoU"]
    assert extra["class_names"] == list(class_names) and set(iou) == set(class_names)  # records sort keys
    present = [v for v in iou.values() if v is not None]
    assert present and all(0.0 <= v <= 100.0 for v in present)
    assert metrics["mIoU"] == pytest.approx(sum(present) / len(present))
    json.dumps(extra, allow_nan=False)                # nothing that JSON cannot hold


def test_voc12aug_tiny_through_the_cli_writes_a_record(synth_root, resnet18_checkpoint, tmp_path):
    from densebench.cli import main
    from densebench.data.voc import VOC_CLASSES

    cfg, label = make_config(seg_voc12aug_fcn.Config, seg_voc12aug_fcn.NAME, "tiny")
    assert label == "tiny" and cfg.test_mode == "whole" and not cfg.align_corners
    out = tmp_path / "results"
    code = main(["evaluate", str(resnet18_checkpoint), "--data-root", str(synth_root), "--protocols", "seg_voc12aug_fcn",
                 "--preset", "tiny", "--arch", "resnet18", "--out", str(out)])
    assert code == 0
    records = list((out / "records").rglob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["protocol"] == "seg_voc12aug_fcn" and record["comparable"] is False
    _check_output(record["metrics"], record["extra"], ["background", *VOC_CLASSES], cfg.iterations)
    splits = record["data"]["splits"]
    assert splits["voc12_seg_aug"] > 0 and splits["voc12_seg_train"] > 0 and splits["voc12_seg_val"] > 0
    assert record["extra"]["backbone_arch"] == "resnet18"
    assert list((out / "work").rglob(segmentation.STATE_FILE))


def test_cityscapes_tiny_runs_the_slide_path(synth_root, resnet18_checkpoint, tmp_path, monkeypatch):
    from densebench.data.cityscapes import CITYSCAPES_CLASSES

    cfg, _ = make_config(seg_cityscapes_fcn.Config, seg_cityscapes_fcn.NAME, "tiny")
    assert cfg.test_mode == "slide" and cfg.align_corners
    windows = []
    real_slide = segmentation.slide_logits

    def counting_slide(encode, image, *args, **kwargs):
        windows.append(len(segmentation.window_boxes(image.shape[2], image.shape[3], *args[1:3])))
        return real_slide(encode, image, *args, **kwargs)

    monkeypatch.setattr(segmentation, "slide_logits", counting_slide)
    out = seg_cityscapes_fcn.run(_context(resnet18_checkpoint, synth_root, tmp_path), cfg)
    _check_output(out.metrics, out.extra, CITYSCAPES_CLASSES, cfg.iterations)
    assert windows and min(windows) > 1                # the window is smaller than the test image


def test_interrupted_run_resumes_exactly(synth_root, resnet18_checkpoint, tmp_path, monkeypatch):
    overrides = {"iterations": 4, "eval_interval": 2, "checkpoint_interval": 2, "batch_size": 2,
                 "crop_size": [48, 48], "train_scale": [96, 72], "test_scale": [64, 48]}
    cfg, _ = make_config(seg_voc12aug_fcn.Config, seg_voc12aug_fcn.NAME, "tiny", overrides)
    straight = seg_voc12aug_fcn.run(_context(resnet18_checkpoint, synth_root, tmp_path / "a"), cfg)
    assert [h["iteration"] for h in straight.extra["history"]] == [2, 4]

    real_loss, calls = segmentation.fcn_loss, []

    def failing_loss(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated preemption in iteration 3")
        return real_loss(*args)

    monkeypatch.setattr(segmentation, "fcn_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        seg_voc12aug_fcn.run(_context(resnet18_checkpoint, synth_root, tmp_path / "b"), cfg)
    monkeypatch.setattr(segmentation, "fcn_loss", real_loss)
    state = torch.load(tmp_path / "b" / segmentation.STATE_FILE, weights_only=True)
    assert state["iteration"] == 2
    resumed = seg_voc12aug_fcn.run(_context(resnet18_checkpoint, synth_root, tmp_path / "b"), cfg)
    assert resumed.extra["resumed_from"] == 2
    assert resumed.metrics == straight.metrics and resumed.extra["history"] == straight.extra["history"]
    final_a = torch.load(tmp_path / "a" / segmentation.STATE_FILE, weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / segmentation.STATE_FILE, weights_only=True)["model"]
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=0, msg=key)
    # a finished run only reports: no training
    again = seg_voc12aug_fcn.run(_context(resnet18_checkpoint, synth_root, tmp_path / "b"), cfg)
    assert again.metrics == straight.metrics and again.extra["resumed_from"] == 4


def test_backbone_geometry_equals_torchvision_dilated_resnet():
    """The FCN backbone (ResNet-D8 with mmseg's contract_dilation) equals torchvision's own dilated
    ResNet-50 (`replace_stride_with_dilation=[False, True, True]`, whose first block of a dilated
    stage keeps the previous dilation) on the same weights, and maps 64 px to 8 px."""
    import torchvision

    cfg = seg_voc12aug_fcn.Config(head_channels=16, aux_channels=8)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = segmentation.build_segmentor("resnet50", state, cfg).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c3, c4 = ours.backbone_features(x)
        net = reference
        expected = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    assert c3.shape[-1] == c4.shape[-1] == 8
    torch.testing.assert_close(c4, expected, rtol=1e-5, atol=1e-5)
