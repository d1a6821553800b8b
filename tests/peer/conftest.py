"""The peer tests: densebench's transfer trainers against mmdet 2.x / mmseg 0.x, the frameworks
that produced the published DenseCL numbers.

They run only in `.venv-peer` (built by scripts/setup_peer_env.sh, run by scripts/run_peer_tests.sh),
where mmcv 1.7.2 is installed without its compiled ops. Before mmcv is imported, a stand-in
`mmcv._ext` module is registered: every op the reference models call at run time is provided by
tests/peer/mmcv_ops_standin.py on top of torchvision.ops (each checked against the op's documented
semantics in test_peer_ops.py); any other op raises, so a silent fallback cannot hide.
"""
from __future__ import annotations

import sys

import pytest

import mmcv_ops_standin  # tests/peer is on sys.path (pytest prepend import mode)

mmcv_ops_standin.install()

try:
    import mmcv  # noqa: F401
    import mmdet  # noqa: F401
    import mmseg  # noqa: F401
except ImportError as error:  # pragma: no cover - the runner script checks this first and fails CI
    pytest.exit(f"peer tests need .venv-peer (scripts/setup_peer_env.sh): {error}", returncode=1)
