#!/usr/bin/env bash
# The peer tests (tests/peer/): densebench against mmdet 2.28.2 / mmsegmentation 0.30.0 in .venv-peer.
# Builds the peer environment if needed; fails (exit 1) if it cannot be built or imported, so CI
# never passes with the references silently skipped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
bash scripts/setup_peer_env.sh
peer_py="${DENSEBENCH_PEER_VENV:-$PWD/.venv-peer}/bin/python"
if ! "$peer_py" -c "import sys; sys.path.insert(0, 'tests/peer'); import mmcv_ops_standin; mmcv_ops_standin.install(); import mmcv.ops, mmdet.models, mmseg.models" >/dev/null 2>&1; then
  echo "peer tests: the reference environment ($peer_py) cannot import mmcv/mmdet/mmseg; rebuild it with scripts/setup_peer_env.sh" >&2
  exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
DENSEBENCH_PEER=1 exec "$peer_py" -m pytest -q -p no:cacheprovider tests/peer "$@"
