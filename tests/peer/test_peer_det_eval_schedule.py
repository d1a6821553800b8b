"""Detection evaluation and optimisation against mmdet 2.28.2 / mmcv 1.7.2 (issue 17, items 4-5).

- VOC metric: densebench's `evaluate_voc_detection` equals mmdet's `eval_map` (dataset 'voc07',
  i.e. 11-point AP, `use_legacy_coordinate=True` as mmdet's VOCDataset.evaluate calls it) on
  identical predictions, with difficult boxes ignored and with them counted.
- Learning rate at every iteration of the two full schedules equals mmcv's StepLrUpdaterHook
  (MMSelfSup 0.x configs/benchmarks/mmdetection/_base_/schedules/schedule_24k.py, iteration
  based; schedule_1x.py, epoch based with an iteration warm-up), and the epoch length equals the
  one of mmdet's DistributedGroupSampler (8 GPUs x 2 images).
- SGD: the parameter groups, momentum and weight decay equal mmcv's `build_optimizer` on the
  same model (schedule_*.py: SGD lr 0.02, momentum 0.9, weight_decay 1e-4, no paramwise_cfg).
"""
import numpy as np
import pytest
import torch
from mmcv.runner import build_optimizer
from mmcv.runner.hooks.lr_updater import StepLrUpdaterHook
from mmdet.core.evaluation import eval_map
from mmdet.datasets.samplers import DistributedGroupSampler

from densebench.protocols import det_coco_maskrcnn_fpn, det_voc0712_c4, detection
from densebench.protocols.voc_det_eval import evaluate_voc_detection, voc_box_to_continuous

NUM_CLASSES = 5


def random_voc_set(seed=0, num_images=40):
    """Integer XML boxes (so IoU can hit 0.5 exactly), difficult flags, detections jittered from
    the ground truth by whole pixels plus random boxes, distinct scores."""
    rng = np.random.default_rng(seed)
    ground_truth, detections = [], []
    for _ in range(num_images):
        n = rng.integers(1, 6)
        xy = rng.integers(1, 300, size=(n, 2))
        wh = rng.integers(4, 120, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)
        labels = rng.integers(0, NUM_CLASSES, size=n)
        difficult = rng.random(n) < 0.2
        ground_truth.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        keep = rng.random(n) < 0.85
        jittered = boxes[keep] + rng.integers(-6, 7, size=(int(keep.sum()), 4))
        m = rng.integers(0, 4)
        xy = rng.integers(1, 300, size=(m, 2))
        extra = np.concatenate([xy, xy + rng.integers(4, 120, size=(m, 2))], axis=1)
        det_boxes = np.concatenate([jittered, extra]).astype(np.float64)
        det_labels = np.concatenate([labels[keep], rng.integers(0, NUM_CLASSES, size=m)])
        wrong = rng.random(len(det_labels)) < 0.1
        det_labels[wrong] = rng.integers(0, NUM_CLASSES, size=int(wrong.sum()))
        detections.append({"boxes": det_boxes, "labels": det_labels, "scores": rng.random(len(det_labels))})
    return ground_truth, detections


def mmdet_inputs(ground_truth, detections, ignore_difficult):
    results = [[np.concatenate([d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c, None]], axis=1)
                for c in range(NUM_CLASSES)] for d in detections]
    annotations = []
    for g in ground_truth:
        ignored = g["difficult"] if ignore_difficult else np.zeros_like(g["difficult"])
        annotations.append({"bboxes": g["boxes"][~ignored], "labels": g["labels"][~ignored],
                            "bboxes_ignore": g["boxes"][ignored].reshape(-1, 4), "labels_ignore": g["labels"][ignored]})
    return results, annotations


def continuous(entries, ignore_difficult):
    """The same data in densebench's frame (XML -> continuous, once, for boxes and predictions)."""
    out = []
    for e in entries:
        e = dict(e, boxes=voc_box_to_continuous(e["boxes"]).astype(np.float64))
        if "difficult" in e and not ignore_difficult:
            e["difficult"] = np.zeros_like(e["difficult"])
        out.append(e)
    return out


@pytest.mark.parametrize("ignore_difficult", [True, False])
@pytest.mark.parametrize("iou", [0.5, 0.75])
def test_voc07_map_equals_mmdet_eval_map(ignore_difficult, iou):
    ground_truth, detections = random_voc_set()
    results, annotations = mmdet_inputs(ground_truth, detections, ignore_difficult)
    mean_ap, per_class = eval_map(results, annotations, iou_thr=iou, dataset="voc07", nproc=1,
                                  use_legacy_coordinate=True, logger="silent")
    ours = evaluate_voc_detection(continuous(ground_truth, ignore_difficult), continuous(detections, True),
                                  [f"c{c}" for c in range(NUM_CLASSES)], (iou,), inclusive=True)
    # mmdet accumulates precision/recall in float32: equal to float32 rounding
    np.testing.assert_allclose(ours.ap[0] / 100, [c["ap"] for c in per_class], rtol=0, atol=1e-6)
    assert ours.map_at(iou) / 100 == pytest.approx(mean_ap, abs=1e-6)
    assert ours.num_positives.tolist() == [int(c["num_gts"]) for c in per_class]


def test_iou_exactly_at_threshold_counts_for_mmdet_only():
    """Pins the one difference between mmdet's eval_map (IoU >= t) and the devkit (IoU > t)."""
    ground_truth = [{"boxes": np.array([[1.0, 1, 20, 10]]), "labels": np.array([0]), "difficult": np.array([False])}]
    # XML [1, 1, 20, 10] is 20 x 10 pixels; [1, 1, 10, 10] is 10 x 10 -> IoU exactly 0.5
    detections = [{"boxes": np.array([[1.0, 1, 10, 10]]), "labels": np.array([0]), "scores": np.array([0.9])}]
    results, annotations = mmdet_inputs(ground_truth, detections, True)
    mean_ap, _ = eval_map(results, annotations, iou_thr=0.5, dataset="voc07", nproc=1,
                          use_legacy_coordinate=True, logger="silent")
    args = (continuous(ground_truth, True), continuous(detections, True), ["c0"], (0.5,))
    assert mean_ap == pytest.approx(1.0)
    assert evaluate_voc_detection(*args, inclusive=True).map_at(0.5) == pytest.approx(100.0)
    assert evaluate_voc_detection(*args).map_at(0.5) == 0.0


class FakeRunner:
    """What mmcv's LrUpdaterHook reads: the optimizer, the iteration and the epoch."""

    def __init__(self, optimizer):
        self.optimizer, self.iter, self.epoch = optimizer, 0, 0


def mmcv_lrs(hook, max_iter, iters_per_epoch=None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02, momentum=0.9, weight_decay=1e-4)
    runner = FakeRunner(optimizer)
    hook.before_run(runner)
    lrs = []
    for iteration in range(max_iter):
        runner.iter = iteration
        if iters_per_epoch and iteration % iters_per_epoch == 0:
            runner.epoch = iteration // iters_per_epoch
            hook.before_train_epoch(runner)
        hook.before_train_iter(runner)
        lrs.append(optimizer.param_groups[0]["lr"])
    return np.array(lrs)


def test_c4_24k_schedule_equals_mmcv_at_every_iteration():
    cfg = det_voc0712_c4.Config()
    total = detection.images_per_gpu_for(cfg.images_per_step, cfg.images_per_gpu, 1, "x")
    ours = detection.scaled_schedule(cfg.base_lr, cfg.max_iter, cfg.lr_steps, cfg.warmup_iters, cfg.warmup_factor,
                                     cfg.images_per_step, total)
    # schedule_24k.py
    hook = StepLrUpdaterHook(step=[18000, 22000], by_epoch=False, warmup="linear", warmup_iters=100,
                             warmup_ratio=0.001)
    assert ours.max_iter == 24000
    reference = mmcv_lrs(hook, 24000)
    np.testing.assert_allclose([ours.lr_at(i) for i in range(24000)], reference, rtol=1e-12, atol=0)


def test_mask_rcnn_1x_schedule_and_epoch_length_equal_mmdet():
    cfg = det_coco_maskrcnn_fpn.Config()
    rng = np.random.default_rng(0)
    group_ids = (rng.random(3001) < 0.7).astype(int).tolist()        # wide images flagged 1, as mmdet

    class Flagged:
        flag = np.array(group_ids, dtype=np.uint8)

        def __len__(self):
            return len(group_ids)

    sampler = DistributedGroupSampler(Flagged(), samples_per_gpu=2, num_replicas=8, rank=0)
    iters_per_epoch = len(sampler) // 2
    assert det_coco_maskrcnn_fpn.iterations_per_epoch(group_ids, cfg.images_per_step) == iters_per_epoch
    ours = det_coco_maskrcnn_fpn.train_schedule(cfg, group_ids, 16)
    assert ours.max_iter == 12 * iters_per_epoch
    # schedule_1x.py: epoch-based steps at 8 and 11, linear warm-up over 1000 iterations
    hook = StepLrUpdaterHook(step=[8, 11], warmup="linear", warmup_iters=1000, warmup_ratio=0.001)
    reference = mmcv_lrs(hook, ours.max_iter, iters_per_epoch)
    np.testing.assert_allclose([ours.lr_at(i) for i in range(ours.max_iter)], reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("builder", ["c4", "fpn"])
def test_sgd_groups_momentum_weight_decay_equal_mmcv(builder):
    import torchvision
    resnet = torchvision.models.resnet18(weights=None, norm_layer=torch.nn.BatchNorm2d)
    if builder == "c4":
        model = detection.build_faster_rcnn_c4(resnet, 3, det_voc0712_c4.Config())
    else:
        model = detection.build_mask_rcnn_fpn(resnet, 3, det_coco_maskrcnn_fpn.Config())
    settings = det_voc0712_c4.convention_settings(det_voc0712_c4.Config())      # the mmdet convention
    ours = torch.optim.SGD(detection.parameter_groups(model, 1e-4, settings["weight_decay_norm"]), lr=0.02,
                           momentum=0.9)
    reference = build_optimizer(model, dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=0.0001))
    assert len(ours.param_groups) == len(reference.param_groups) == 1
    ours_group, reference_group = ours.param_groups[0], reference.param_groups[0]
    assert [id(p) for p in ours_group["params"]] == [id(p) for p in reference_group["params"]]
    for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
        assert ours_group[key] == reference_group[key], key
