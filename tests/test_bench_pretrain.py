"""bench_pretrain.py: the char-level data both recipes train on, the nanoGPT setting's refusal, and the GPU command's
path (run on CPU at a tiny size: the figures come from a GPU, the command must already work)."""
import json
import os
import subprocess
import sys

import numpy as np

import bench_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_char_data_is_nanogpts_ids_and_counts_bytes(tmp_path):
    text = "First Citizen:\nBefore we proceed, hear me speak.\n床前明月光\n" * 30
    bench_pretrain.prepare_char_data(text, str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    chars = meta["chars"]
    assert list(chars) == sorted(set(text))  # nanoGPT's prepare.py: ids of the sorted characters
    ids = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert "".join(chars[i] for i in ids) == text
    n = int(0.9 * len(text))
    assert meta["train_tokens"] == n and meta["val_tokens"] == len(text) - n
    assert meta["bytes"] == {"train": len(text[:n].encode()), "val": len(text[n:].encode())}  # Chinese: 3 bytes


def test_missing_nanogpt_checkout_says_how_to_get_it(tmp_path):
    p = subprocess.run([sys.executable, "bench_pretrain.py", f"--nanogpt={tmp_path}/nanoGPT",
                        f"--out_dir={tmp_path}/out"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "no train.py there" in p.stderr and "git clone https://github.com/karpathy/nanoGPT" in p.stderr


def test_gpu_command_runs_at_a_tiny_size(tmp_path):
    tiny = "--dim=32 --n_layers=1 --n_heads=2 --hidden_dim=64 --block_size=32 --batch_size=2 --compile=False"
    p = subprocess.run([sys.executable, "bench_pretrain.py", "--gpu=True", "--gpu_iters=20", f"--gpu_args={tiny}",
                        f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("config/llama_124m_muon.py on ") and "tokens/s, MFU" in last and "steps 20..20" in last
    config = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert config["optimizer"] == "muon" and config["dim"] == 32  # the preset, shrunk by gpu_args


def test_cpu_samples_follow_the_process_cpu_time(tmp_path):
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(0.6)"
    t0, wall, cpu, samples = bench_pretrain.timed_run([sys.executable, "-c", busy], ROOT, str(tmp_path / "log"))
    if not os.path.isdir("/proc"):
        assert samples == [(t0, 0.0)]  # elsewhere no samples: the bench prints wall time only
        return
    times, cpus = zip(*samples)
    assert cpu >= 1.0 and list(times) == sorted(times) and list(cpus) == sorted(cpus)
    assert abs(cpus[-1] - cpu) < 0.05  # the sleep after the busy second: samples caught up with wait4's figure
    assert len(samples) > 4 and max(cpus) <= cpu + 0.02
