#!/usr/bin/env bash
# Create (once) the virtual environment both README commands use, then install densebench
# into it. Sourced by run_all.sh and run_tests.sh; safe to run again (it only adds what is missing).
#   DENSEBENCH_VENV        where the environment lives (default: .venv in the repository)
#   DENSEBENCH_TORCH_SPEC  torch/torchvision to install when torch is absent
#                          (default: the versions this project is tested with)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DENSEBENCH_VENV:-$repo_root/.venv}"
torch_spec="${DENSEBENCH_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec (first run only; a few minutes)"
  # shellcheck disable=SC2086
  "$py" -m pip install -q --disable-pip-version-check $torch_spec
fi
stamp="$venv/.densebench-installed"
if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing densebench and its dependencies"
  "$py" -m pip install -q --disable-pip-version-check -e "$repo_root[test]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
