#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, torch preinstalled, no network): the densebench
# dependencies its image lacks, downloaded here as cp312 manylinux x86-64 wheels into .whl/
# (git-ignored), to be carried there and installed with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# The image holds numpy, scikit-learn, pandas, tabulate, Pillow, PyYAML, tqdm, matplotlib and
# safetensors (listed in the device notes); pycocotools is missing (synthetic masks, COCO reading
# and evaluation). Its own needs (numpy, matplotlib) are in the image, hence --no-deps.
# Usage: bash scripts/gpu_wheels.sh [DEST]   (default .whl); prints the files and their total size.
set -euo pipefail
dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "pycocotools>=2.0.8"
ls -l "$dest"/*.whl
du -sh "$dest"
