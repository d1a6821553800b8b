"""FCN optimisation and evaluation (VOC12-Aug and Cityscapes) against mmcv 1.7 / mmseg 0.30.

- lr at every iteration of the full schedule: mmcv's PolyLrUpdaterHook, built from the config's
  lr_config and driven with a stand-in runner exactly as IterBasedRunner calls it (before_run,
  then before_train_iter at runner.iter = 0, 1, ...), writes the lr into an optimizer; ours must
  equal it at each iteration.
- SGD: mmcv's build_optimizer on the reference model vs ours: one parameter group, the same
  hyperparameters, every parameter (BN and biases included) decayed, and one identical step.
- mIoU/aAcc/per-class IoU and Acc: mmseg.core.evaluation.mean_iou on identical predictions.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from densebench.protocols import segmentation as seg
from seg_reference import BENCHMARKS, build_reference, reference_to_densebench

BENCHMARK_NAMES = ["voc12aug", "cityscapes"]


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
def test_lr_at_every_iteration_equals_mmcv_poly_hook(benchmark):
    from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook

    reference, cfg = BENCHMARKS[benchmark], BENCHMARKS[benchmark]["densebench"]()
    assert cfg.iterations == reference["max_iters"] and cfg.eval_interval == reference["eval_interval"]
    lr_config = dict(reference["lr_config"])
    assert lr_config.pop("policy") == "poly" and "warmup" not in lr_config  # no warmup configured
    hook = PolyLrUpdaterHook(**lr_config)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=reference["optimizer"]["lr"])
    runner = SimpleNamespace(optimizer=optimizer, iter=0, epoch=0, max_iters=reference["max_iters"])
    hook.before_run(runner)
    expected = []
    for iteration in range(reference["max_iters"]):
        runner.iter = iteration
        hook.before_train_iter(runner)
        expected.append(optimizer.param_groups[0]["lr"])
    ours = [seg.scheduled_lr(iteration, cfg) for iteration in range(cfg.iterations)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
    assert expected[0] == pytest.approx(0.01) and expected[-1] > lr_config["min_lr"]


@functools.lru_cache(maxsize=None)
def _models():
    torch.manual_seed(0)
    reference = build_reference("voc12aug")
    cfg = BENCHMARKS["voc12aug"]["densebench"]()
    ours = seg.FCNSegmentor(seg.build_dilated_resnet("resnet50"), cfg.num_classes, align_corners=cfg.align_corners)
    ours.load_state_dict(reference_to_densebench(reference.state_dict()), strict=True)
    return reference, ours


def test_sgd_groups_and_step_equal_mmcv_build_optimizer():
    from mmcv.runner import build_optimizer

    for name in BENCHMARK_NAMES:
        cfg = BENCHMARKS[name]["densebench"]()
        assert cfg.batch_size == BENCHMARKS[name]["samples_per_gpu"] * 4  # 4 GPUs ([DC] README, [1x] 4xb*)
        assert BENCHMARKS[name]["optimizer"] == BENCHMARKS["voc12aug"]["optimizer"]  # S20 and S40 agree
        assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.01, 0.9, 0.0005)
        # plain OptimizerHook, no Fp16OptimizerHook and no `fp16` key: the reference trained in fp32
        assert BENCHMARKS[name]["optimizer_config"] == {} and cfg.amp is False
    reference_cfg, cfg = BENCHMARKS["voc12aug"], BENCHMARKS["voc12aug"]["densebench"]()
    reference, ours = _models()
    ref_opt = build_optimizer(reference, dict(reference_cfg["optimizer"]))
    our_opt = seg.build_optimizer(ours, cfg)
    assert type(ref_opt) is type(our_opt) is torch.optim.SGD
    assert len(ref_opt.param_groups) == len(our_opt.param_groups) == 1
    keys = ("lr", "momentum", "weight_decay", "dampening", "nesterov")
    assert {k: ref_opt.param_groups[0][k] for k in keys} == {k: our_opt.param_groups[0][k] for k in keys}
    ref_names = {id(p): n for n, p in reference.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    decayed_ref = sorted(next(iter(reference_to_densebench({ref_names[id(p)]: p}))) for p in ref_opt.param_groups[0]["params"])
    decayed_ours = sorted(our_names[id(p)] for p in our_opt.param_groups[0]["params"])
    assert decayed_ref == decayed_ours == sorted(our_names.values())
    # two identical steps (the second one uses the momentum buffers)
    generator = torch.Generator().manual_seed(1)
    ref_params = dict(reference.named_parameters())
    for _ in range(2):
        for name, param in ref_params.items():
            param.grad = torch.randn(param.shape, generator=generator)
            dict(ours.named_parameters())[next(iter(reference_to_densebench({name: param})))].grad = param.grad.clone()
        ref_opt.step(), our_opt.step()
    ours_now = dict(ours.named_parameters())
    for name, param in ref_params.items():
        torch.testing.assert_close(ours_now[next(iter(reference_to_densebench({name: param})))], param, rtol=0, atol=0)


def _predictions(num_classes: int, seed: int):
    """Prediction/label pairs of different sizes: ignored pixels, a label value >= num_classes that
    is not 255, one class predicted but absent from every label, one absent from both."""
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for height, width in [(31, 40), (17, 23), (50, 9)]:
        label = rng.integers(0, num_classes - 2, (height, width))
        pred = np.where(rng.random((height, width)) < 0.6, label, rng.integers(0, num_classes - 1, (height, width)))
        label[rng.random((height, width)) < 0.15] = 255
        label[0, :3] = num_classes  # not a class, not ignored
        preds.append(pred)
        labels.append(label)
    return preds, labels


@pytest.mark.parametrize("benchmark", BENCHMARK_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_miou_equals_mmseg_mean_iou(benchmark, seed):
    from mmseg.core.evaluation import mean_iou

    num_classes = BENCHMARKS[benchmark]["densebench"]().num_classes
    preds, labels = _predictions(num_classes, seed)
    ref = mean_iou(preds, labels, num_classes, ignore_index=255)
    ours = seg.mean_iou(preds, labels, num_classes)
    ref_iou = np.asarray(ref["IoU"], dtype=np.float64)
    assert np.isnan(ref_iou[-1]) and ref_iou[-2] == 0  # the absent classes are exercised
    assert ours["mIoU"] == pytest.approx(100 * np.nanmean(ref_iou), rel=1e-12)
    assert ours["aAcc"] == pytest.approx(100 * float(ref["aAcc"]), rel=1e-12)
    ours_iou = np.array([np.nan if v is None else v for v in ours["per_class_IoU"].values()])
    ours_acc = np.array([np.nan if v is None else v for v in ours["per_class_Acc"].values()])
    np.testing.assert_allclose(ours_iou, 100 * ref_iou, rtol=1e-12)
    np.testing.assert_allclose(ours_acc, 100 * np.asarray(ref["Acc"], dtype=np.float64), rtol=1e-12)
