#!/usr/bin/env bash
# Re-resolves requirements.lock: exact versions of everything requirements.txt pulls in, transitive ones too, under
# constraints.txt (torch). Run it after changing requirements.txt, then `bash test.sh` on the new lock; to see what
# a re-lock would bring before making one, `bash test.sh --latest`.
#
# pip-compile (pip-tools), not uv: it resolves with pip itself, so it reads the same pip configuration that installs
# torch here (a CPU wheel from a local folder, whose metadata lists no CUDA packages); uv would resolve PyPI's CUDA
# build of torch and lock GBs of nvidia-* packages. torch itself stays out of the lock (--unsafe-package): its
# version comes from constraints.txt, and a machine with its own CUDA torch keeps it (setup.sh, SYSTEM_TORCH=1).
set -euo pipefail
cd "$(dirname "$0")"
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q pip-tools==7.7.0
inputs=$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
# --unsafe-package torch replaces pip-tools' default unsafe list, so setuptools and pip get pinned like the rest
"$tools/venv/bin/pip-compile" -q --no-header --no-emit-index-url --no-emit-find-links --strip-extras \
  --unsafe-package torch -c constraints.txt -o "$tools/lock" requirements.txt
{
  echo "# Exact versions for setup.sh, resolved from requirements.txt under constraints.txt by 'bash lock.sh'"
  echo "# (pip-compile $("$tools/venv/bin/pip-compile" --version | awk '{print $NF}'), Python $(python3 -V | cut -d' ' -f2), $(uname -m)). Do not edit: re-lock."
  echo "# inputs-sha256: $inputs"
  cat "$tools/lock"
} > requirements.lock
echo "lock.sh: wrote requirements.lock ($(grep -c '^[a-zA-Z]' requirements.lock) packages); now run: bash test.sh"
