"""setup.sh installs from requirements.lock, and refuses a lock that was not resolved from today's requirements."""
import os
import re
import shutil
import subprocess

from conftest import ROOT


def copy_setup(tmp_path):
    for f in ("setup.sh", "requirements.txt", "constraints.txt", "requirements.lock"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)


def source_setup(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLLM_LATEST", "SYSTEM_TORCH")}  # test.sh --latest
    return subprocess.run(["bash", "-c", "source setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_lock_older_than_requirements_is_refused_naming_the_relock_command(tmp_path):
    copy_setup(tmp_path)
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("fastapi\n")  # a dependency added without re-locking
    run = source_setup(tmp_path)
    assert run.returncode == 1
    assert "bash lock.sh" in run.stdout and "Traceback" not in run.stdout + run.stderr
    assert not (tmp_path / ".venv").exists()  # stopped before installing anything


def test_the_lock_pins_every_requirement_exactly():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        wanted = {re.split(r"[\s<>=!~;\[#]", line.strip())[0].lower().replace("_", "-")
                  for line in f if line.strip() and not line.startswith("#")}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        pinned = dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", f.read(), re.M))
    assert wanted - {"torch"} <= set(pinned), f"not in the lock: {sorted(wanted - {'torch'} - set(pinned))}"
    assert "torch" not in pinned  # its version comes from constraints.txt, and a CUDA machine keeps its own
