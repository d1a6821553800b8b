#!/usr/bin/env bash
# Every GPU check of one device session, most important first, each logged to $OUT (or
# /tmp/gpu_checks): the CUDA-only tests, the pre-training step against MMPreTrain (ResNet-50,
# 224 px, paper queue, batch 64 and 32), the SVM sweeps against the sklearn reference (reference in
# 15 single-threaded processes), the linear-probe check. About 7 minutes on an H200 machine.
# MMPreTrain is taken from .mmpt/ when present (pip install --target .mmpt mmpretrain mmengine
# mmcv-lite==2.0.1 and their pure-Python needs that the GPU image lacks).
set -u
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .mmpt ] && export PYTHONPATH="$PYTHONPATH:$PWD/.mmpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_pretrain_cuda_graph.py tests/test_svm.py \
    -k "cuda or graph" 2>&1 | tee "$out/tests.log"
for batch in 64 32; do
    python3 benchmarks/pretrain_step.py --device cuda --arch resnet50 --size 224 --batch $batch \
        --queue-len 65536 --warmup 3 --iters 20 2>&1 | tee "$out/pretrain_b$batch.log"
done
python3 benchmarks/svm_voc07.py --device cuda --lowshot-k 1 8 96 --samples 5 --sklearn-procs 15 2>&1 \
    | tee "$out/svm.log"
timeout 150 python3 benchmarks/linear_probe_gpu_check.py 2>&1 | tee "$out/linear_probe.log"
