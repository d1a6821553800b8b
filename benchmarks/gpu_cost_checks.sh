#!/usr/bin/env bash
# Issue 20 on the GPU machine in one command: benchmarks/table_cost.py (every protocol timed on
# synthetic data at the real sizes and projected to the paper schedules, the probes with
# decode=cpu and decode=device) then benchmarks/precision_check.py (fp32 vs bf16/fp16 autocast).
# Logs and JSON go to $OUT (or /tmp/gpu_cost_checks). Each part has its own timeout; on an H200
# the whole should take about 6-8 minutes, at most 9 (300 s + 240 s + setup).
# Carry .whl (made here by scripts/gpu_wheels.sh): the image lacks pycocotools.
#   run: bash benchmarks/gpu_cost_checks.sh        (device tool: carry [".whl"], timeout_s 570)
set -u
out=${OUT:-/tmp/gpu_cost_checks}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cpus $(nproc)";
  python3 -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'Pillow', PIL.__version__)"; } \
    2>&1 | tee "$out/gpu.txt"
timeout 300 python3 benchmarks/table_cost.py --json-out "$out/table_cost.json" 2>&1 | tee "$out/table_cost.log"
timeout 240 python3 benchmarks/precision_check.py --json-out "$out/precision.json" 2>&1 | tee "$out/precision.log"
