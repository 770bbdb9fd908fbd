"""DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 on CPU with 2 processes (gloo) give the loss curve of one process with the
same global batch, and their (sharded) checkpoints resume.

Tolerance: every step's train loss and every val loss within 1e-5 (absolute) of the one-process run, over 20
steps of AdamW at lr 3e-3. The runs are fp32 and see identical data, so only the order of the floating-point
reductions differs (an all-reduce of two half-sums instead of one accumulated sum): they agree to 5e-7 or better.
For scale, a wrong batch split (both ranks drawing the same micro-batches) is off by 5e-4 at step 1 and by 6e-2
in val loss at step 20.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from test_pretrain import ROOT, make_data_dir, read_metrics

pytestmark = pytest.mark.slow
ARGS = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--log_interval=1"]  # tiny.py: grad_accum=2
TOL = 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args, timeout=300):
    script = [os.path.join(ROOT, "pretrain.py"), os.path.join(ROOT, "config/tiny.py"), *args]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    elif launcher == "deepspeed":
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus=2",
               f"--master_port={free_port()}", *script]
    else:
        cmd = [sys.executable, *script]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(str(tmp_path_factory.mktemp("data")), with_tokenizer=False)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    launch("python", ARGS + [f"--data_dir={data_dir}", f"--out_dir={out}", "--dtype=float32"])
    return out


CASES = {  # name: (launcher, extra args, split the run in two halves and resume the second from the checkpoint)
    "ddp": ("torchrun", [], False),
    "fsdp": ("torchrun", ["--parallel=fsdp"], True),
    "zero1": ("torchrun", ["--parallel=deepspeed", "--deepspeed_config=config/ds_zero1.json"], False),
    "zero2": ("torchrun", ["--parallel=deepspeed", "--deepspeed_config=config/ds_zero2.json"], True),
    "zero3": ("deepspeed", ["--parallel=deepspeed", "--deepspeed_config=config/ds_zero3.json"], False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, data_dir, one_process, tmp_path):
    if case.startswith("zero"):
        pytest.importorskip("deepspeed")
    launcher, extra, split = CASES[case]
    args = ARGS + extra + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--dtype=float32"]
    if split:
        launch(launcher, args + ["--max_iters=10"])
        r = launch(launcher, args + ["--init_from=resume"])
        assert "resumed from" in r.stdout and "step_00000010" in r.stdout
    else:
        r = launch(launcher, args)
    assert "world=2" in r.stdout
    ours = read_metrics(str(tmp_path))
    for key in ("train_loss", "val_loss"):
        a = {x["step"]: x[key] for x in read_metrics(one_process) if key in x}
        b = {x["step"]: x[key] for x in ours if key in x}
        assert a.keys() == b.keys(), key
        worst = max(abs(a[s] - b[s]) for s in a)
        print(f"{case}: {key} differs from one process by at most {worst:.1e}")
        assert worst < TOL, f"{case}: {key} differs from one process by up to {worst:.2e}: {a} vs {b}"
    assert ours[-1]["val_loss"] < ours[0]["val_loss"] - 0.3  # the curve is not flat
    # the HF export gathered the whole (sharded) model: the one-process run's weights
    from safetensors.torch import load_file
    a = load_file(os.path.join(one_process, "hf", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "hf", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
