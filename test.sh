#!/usr/bin/env bash
# The test command: bootstraps .venv, then runs the suite (GPU tests skip without CUDA). Extra args go to pytest.
set -e
source "$(dirname "$0")/setup.sh"
python -m pytest -q tests "$@"
