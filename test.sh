#!/usr/bin/env bash
# The test command: bootstraps .venv, then runs the suite (GPU tests skip without CUDA). Extra args go to pytest.
#   bash test.sh --latest   the same suite in a throwaway venv with the newest releases (not the lock): run it
#                           before re-locking, so that an upgrade is a tested step
set -e
[ "${1:-}" = --latest ] && { shift; export TINYLLM_LATEST=1; }
source "$(dirname "$0")/setup.sh"
# tiny models: one thread each, and one pytest worker per core (pytest-xdist) rather than threads that
# oversubscribe the cores (torchrun does the same per process). TEST_WORKERS=0 runs in this process, serially.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -n "${TEST_WORKERS:-auto}" "$@"  # pytest.ini: testpaths = tests
