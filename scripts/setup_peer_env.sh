#!/usr/bin/env bash
# Create (once) .venv-peer: the test-only reference frameworks (mmcv 1.7.2 without its compiled
# ops, mmdet 2.28.2, mmsegmentation 0.30.0) that tests/peer/ compares densebench against.
# It reuses .venv's torch/torchvision/numpy through a .pth file (no second 5 GB torch), and keeps
# the mm* packages and their older setuptools out of .venv. Never a runtime dependency.
#   DENSEBENCH_VENV       the main environment (default .venv, created by setup_env.sh)
#   DENSEBENCH_PEER_VENV  where the peer environment lives (default .venv-peer)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
main_venv="${DENSEBENCH_VENV:-$repo_root/.venv}"
peer_venv="${DENSEBENCH_PEER_VENV:-$repo_root/.venv-peer}"
stamp="$peer_venv/.peer-installed-v1"
if [ -f "$stamp" ]; then
  exit 0
fi
python_bin="$main_venv/bin/python"
main_site="$("$python_bin" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$peer_venv"
echo "[peer] creating $peer_venv (mmcv 1.7.2 without ops, mmdet 2.28.2, mmsegmentation 0.30.0)"
"$python_bin" -m venv --without-pip "$peer_venv"
peer_py="$peer_venv/bin/python"
peer_site="$("$peer_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The peer's own site-packages come first; the main environment's after it (torch, numpy, densebench).
echo "$main_site" > "$peer_site/zz_densebench_main_env.pth"
pip_in_peer=("$python_bin" -m pip --disable-pip-version-check -q install --target "$peer_site" --no-deps)
"${pip_in_peer[@]}" "setuptools<70" wheel
"${pip_in_peer[@]}" addict "yapf==0.40.1" "importlib_metadata<7" zipp opencv-python-headless six \
  terminaltables prettytable wcwidth packaging platformdirs tomli
# mmcv builds its pure-Python part in seconds when its compiled ops are not requested.
PYTHONPATH="$peer_site" MMCV_WITH_OPS=0 "${pip_in_peer[@]}" --no-build-isolation "mmcv==1.7.2"
"${pip_in_peer[@]}" "mmdet==2.28.2" "mmsegmentation==0.30.0"
touch "$stamp"
echo "[peer] ready: $peer_py"
