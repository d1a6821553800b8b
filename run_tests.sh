#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs pytest (fast tests plus the slow
# end-to-end ones). Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python -m pytest -q "$@"
