"""Pretraining benchmarks (figures for BENCHMARKS.md).

    python bench_pretrain.py --nanogpt=../nanoGPT    # CPU: config/shakespeare_char.py against nanoGPT's own train.py
                                                     #   and CPU recipe on tinyshakespeare (char level), one run
    python bench_pretrain.py                         # the same without nanoGPT: ours, Muon vs AdamW
    python bench_pretrain.py --gpu=True              # GPU: tokens/s and MFU of config/llama_124m_muon.py
    python bench_pretrain.py --attention=True --threads=1   # CPU: SDPA forward+backward, fp32 vs bf16, by length

nanoGPT (`git clone https://github.com/karpathy/nanoGPT`, never part of this repository) runs as its README says for
a CPU: `python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0` (plus --out_dir under ours), on its data/shakespeare_char made by its own
prepare.py from the same tinyshakespeare text (../shared/data; written there as the input.txt prepare.py would
download). Our char-level data is made here the same way and checked to be the same token ids.

Like terms: nanoGPT's val loss is an estimate over 20 random batches (15k tokens, a fresh draw each time, about
+-0.02); ours is measured on fixed windows (eval_iters x batch_size windows of 64 tokens, PretrainData.val_batch).
nanoGPT's final checkpoint (its best estimate, normally step 2000) is scored here on those same fixed windows, and
that is "its final val loss". Times are wall clock from process launch (Python and torch imports included): for
nanoGPT to its exit, for ours to the evaluation that reached the level (evaluations and checkpoints on the way
included). Two lanes run side by side, each with `threads` torch threads: nanoGPT then ours with optimizer=adamw,
and ours then ours with max_iters=long_iters, so each run shares the machine with one other (other work on the
machine slows all of them alike: the load average is printed, and the CPU seconds each process used; ours also
by the evaluation that reached the level, read from /proc on Linux: other work inflates it far less than wall).
"""
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import configurator
import inference

text_path = "../shared/data/pretrain_en/tinyshakespeare/input.txt.gz"
nanogpt = ""                            # a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT); "": none
nanogpt_args = ""                       # more nanoGPT settings after its recipe's (a short run to check the path)
config = "config/shakespeare_char.py"   # ours
long_iters = 800                        # ours again with this max_iters: the best val within nanoGPT's wall time
out_dir = "out/bench_pretrain"
threads = 1                             # torch threads of every run (OMP_NUM_THREADS); 0: torch's default (all cores)
gpu = False
gpu_config = "config/llama_124m_muon.py"
gpu_iters = 60                          # the first log interval (compilation) is left out of the figure
gpu_args = ""                           # more pretrain.py settings for --gpu (a tiny shape checks the path on CPU)
attention = False

NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def child_env():
    env = dict(os.environ)
    if threads:  # one thread is the fair setting when other work holds some of the cores
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_samples(pid, samples, stop):
    """(time, CPU seconds so far) of process pid every quarter second, from /proc (Linux; elsewhere none), so that
    the CPU a run had used by one of its evaluations can be read off."""
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.25):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            return
        samples.append((time.time(), (int(fields[11]) + int(fields[12])) / tick))  # utime + stime


def timed_run(cmd, cwd, log_path):
    """Run cmd to its end with output to log_path; (launch time, wall seconds, CPU seconds of that process, its
    cpu_samples)."""
    t0 = time.time()
    samples, stop = [(t0, 0.0)], threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        sampler = threading.Thread(target=cpu_samples, args=(proc.pid, samples, stop), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # its own CPU time, while another run goes on beside it
        stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode:
        with open(log_path) as f:
            raise SystemExit(f"{' '.join(cmd)} (in {cwd}) failed; the end of {log_path}:\n{f.read()[-3000:]}")
    return t0, wall, usage.ru_utime + usage.ru_stime, samples


# ------------------------------------------------------------------------------------- data

def read_text():
    if not os.path.isfile(text_path):
        raise SystemExit(f"{text_path}: not found (the shared data directory beside the checkout)")
    with gzip.open(text_path, "rt", encoding="utf-8") as f:
        return f.read()


def prepare_char_data(text, data_dir):
    """nanoGPT's data/shakespeare_char/prepare.py: ids of the sorted characters, the last 10% val; plus the UTF-8
    bytes behind each split (bits per byte)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    os.makedirs(data_dir, exist_ok=True)
    ids[:n].tofile(os.path.join(data_dir, "train.bin"))
    ids[n:].tofile(os.path.join(data_dir, "val.bin"))
    meta = {"format": "pretrain", "dtype": "uint16", "vocab_size": len(chars), "train_tokens": n,
            "val_tokens": len(ids) - n, "bytes": {"train": len(text[:n].encode()), "val": len(text[n:].encode())},
            "bos_id": None, "eos_id": None, "sources": [text_path], "chars": "".join(chars)}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


def prepare_nanogpt_data(text, data_dir):
    """nanoGPT's own prepare.py on our text; its ids must be ours."""
    folder = os.path.join(nanogpt, "data", "shakespeare_char")
    input_txt = os.path.join(folder, "input.txt")
    if os.path.isfile(input_txt):
        with open(input_txt, encoding="utf-8") as f:
            if f.read() != text:
                raise SystemExit(f"{input_txt}: not the text of {text_path}; move it away and run again")
    else:
        with open(input_txt, "w", encoding="utf-8") as f:
            f.write(text)
    timed_run([sys.executable, "prepare.py"], folder, os.path.join(out_dir, "nanogpt_prepare.log"))
    for split in ("train", "val"):
        with open(os.path.join(folder, f"{split}.bin"), "rb") as a, open(os.path.join(data_dir, f"{split}.bin"),
                                                                          "rb") as b:
            if a.read() != b.read():
                raise SystemExit(f"{folder}/{split}.bin differs from {data_dir}/{split}.bin: not the same ids")


# ------------------------------------------------------------------------------------- the runs

def run_ours(name, data_dir, *overrides):
    """pretrain.py with `config` as a user runs it: its eval records (elapsed_s from the launch), wall, CPU."""
    run_dir = os.path.join(out_dir, name)
    cmd = [sys.executable, "pretrain.py", config, f"--data_dir={data_dir}", f"--out_dir={run_dir}",
           "--overwrite=True", *overrides]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    t0, wall, cpu, samples = timed_run(cmd, ".", os.path.join(out_dir, f"{name}.log"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    times, cpus = zip(*samples, (t0 + wall, cpu))
    for r in evals:
        r["elapsed_s"] = r["time"] - t0
        r["cpu_s"] = float(np.interp(r["time"], times, cpus)) if len(samples) > 1 else None
    return {"evals": evals, "wall": wall, "cpu": cpu}


def run_nanogpt():
    """nanoGPT's README command; its val estimates from its log, its wall and CPU seconds."""
    run_dir = os.path.abspath(os.path.join(out_dir, "nanogpt"))
    cmd = [sys.executable, "train.py", *NANOGPT_RECIPE, f"--out_dir={run_dir}", *nanogpt_args.split()]
    print(f"nanoGPT: (in {nanogpt}) {' '.join(cmd[1:])}", flush=True)
    log_path = os.path.join(out_dir, "nanogpt.log")
    _, wall, cpu, _ = timed_run(cmd, nanogpt, log_path)
    with open(log_path) as f:
        estimates = [(int(s), float(v)) for s, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                                                                  f.read())]
    return {"estimates": estimates, "wall": wall, "cpu": cpu, "ckpt": os.path.join(run_dir, "ckpt.pt")}


@torch.no_grad()
def score_nanogpt(ckpt_path, val_batches):
    """nanoGPT's checkpoint (its model.py, imported under another name: ours is model.py too) on our val windows."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(ckpt_path, map_location="cpu")
    net = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    net.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    net.eval()
    losses = [net(x.contiguous(), y.contiguous())[1].item() for x, y in val_batches]  # its loss views the targets
    return sum(losses) / len(losses), ckpt["iter_num"]


def first_at(evals, level):
    return next((r for r in evals if r["val_loss"] <= level), None)


def bench_shakespeare():
    if nanogpt and not os.path.isfile(os.path.join(nanogpt, "train.py")):
        raise SystemExit(f"--nanogpt={nanogpt}: no train.py there; get nanoGPT with "
                         f"git clone https://github.com/karpathy/nanoGPT")
    text = read_text()
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.join(out_dir, "data")
    prepare_char_data(text, data_dir)
    if nanogpt:
        prepare_nanogpt_data(text, data_dir)
    cfg = configurator.load_config_file(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # pretrain.py's device=auto
    name, why = inference.resolve_dtype(cfg.get("dtype", "auto"), device)
    print(f"tinyshakespeare char-level; ours in dtype={name} ({why}); {threads or 'default'} torch thread(s) per "
          f"run; load average {os.getloadavg()[0]:.2f} at start (other work on this machine slows every run)")
    if not nanogpt:
        print("nanoGPT: skipped (--nanogpt=PATH to a checkout: git clone https://github.com/karpathy/nanoGPT)")

    # two lanes side by side, so that every run shares the machine with one other run of this benchmark
    with ThreadPoolExecutor(2) as pool:
        lane = pool.submit(lambda: (run_nanogpt() if nanogpt else None,
                                    run_ours("ours_adamw", data_dir, "--optimizer=adamw")))
        ours = run_ours("ours", data_dir)
        long = run_ours("ours_long", data_dir, f"--max_iters={long_iters}",
                        f"--eval_interval={max(long_iters // 20, 1)}")
        ng, adamw = lane.result()

    print(f"\nload average now {os.getloadavg()[0]:.2f}; val loss on {cfg.get('eval_iters')} x "
          f"{cfg.get('batch_size')} fixed windows of 64 tokens (PretrainData.val_batch)")
    if ng:
        from data import open_data_dir
        from pretrain import PretrainData
        if cfg.get("block_size") != 64:
            raise SystemExit(f"{config}: block_size must be 64, nanoGPT's, for both to be scored on the same windows")
        windows = PretrainData(open_data_dir(data_dir), 64, cfg["batch_size"], cfg.get("seed", 1337))
        end, at_iter = score_nanogpt(ng["ckpt"], [windows.val_batch(i) for i in range(cfg["eval_iters"])])
        print(f"nanoGPT CPU recipe: {ng['wall']:.1f}s wall, {ng['cpu']:.1f}s CPU; its own final estimate "
              f"{ng['estimates'][-1][1]:.4f} (step {ng['estimates'][-1][0]}); its checkpoint (step {at_iter}) on "
              f"our windows: {end:.4f}")
        hit = first_at(ours["evals"], end)
        print(f"time to nanoGPT's final val loss {end:.4f}: " + (
            f"ours step {hit['step']}, {hit['elapsed_s']:.1f}s wall = {hit['elapsed_s'] / ng['wall']:.3f}x nanoGPT's "
            f"(val {hit['val_loss']:.4f})" + (f"; {hit['cpu_s']:.1f}s CPU = {hit['cpu_s'] / ng['cpu']:.3f}x nanoGPT's"
                                               if hit["cpu_s"] is not None else "") if hit else "not reached by ours"))
        within = [r for r in long["evals"] if r["elapsed_s"] <= ng["wall"]]
        best = min(within, key=lambda r: r["val_loss"]) if within else None
        print(f"best val within nanoGPT's wall time ({ng['wall']:.1f}s), {config} --max_iters={long_iters}: " + (
            f"{best['val_loss']:.4f} at step {best['step']}, {best['elapsed_s']:.1f}s" if best else "no evaluation"))
    fast, slow = sorted((ours, adamw), key=lambda run: run["evals"][-1]["elapsed_s"])
    fast_name = f"optimizer={cfg.get('optimizer', 'adamw') if fast is ours else 'adamw'}"
    done = fast["evals"][-1]
    seen = [r for r in slow["evals"] if r["elapsed_s"] <= done["elapsed_s"]]
    print(f"equal wall time: the {fast_name} run ended at {done['elapsed_s']:.1f}s with val {done['val_loss']:.4f}; the "
          f"other's last val by then: " + (f"{seen[-1]['val_loss']:.4f} (step {seen[-1]['step']})" if seen else "none"))
    print(f"\n{'run':<34}{'steps':>6}{'final val':>10}{'val bpb':>9}{'best val':>9}{'wall s':>8}{'CPU s':>8}")
    for label, run in ((f"ours ({cfg.get('optimizer', 'adamw')})", ours), ("ours, optimizer=adamw", adamw),
                       (f"ours, max_iters={long_iters}", long)):
        last = run["evals"][-1]
        print(f"{label:<34}{last['step']:>6}{last['val_loss']:>10.4f}{last.get('val_bpb', float('nan')):>9.4f}"
              f"{min(r['val_loss'] for r in run['evals']):>9.4f}{run['wall']:>8.1f}{run['cpu']:>8.1f}")


def bench_gpu():
    """config/llama_124m_muon.py through pretrain.py on random tokens: the trainer's tokens/s and MFU. Without CUDA
    (a check of the command path, with gpu_args shrinking the model) the figures say nothing about a GPU."""
    if not torch.cuda.is_available():
        print("no CUDA: this checks the command path only; its figures are not GPU figures")
    data_dir = os.path.join(out_dir, "random_tokens")
    os.makedirs(data_dir, exist_ok=True)
    n = 20_000_000  # throughput does not care what the tokens say
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", n // 100)):
        rng.integers(0, 32000, size=size, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump({"format": "pretrain", "dtype": "uint16", "vocab_size": 32000, "train_tokens": n,
                   "val_tokens": n // 100}, f)
    run_dir = os.path.join(out_dir, "gpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, why = inference.resolve_dtype(configurator.load_config_file(gpu_config).get("dtype", "auto"), device)
    print(f"{gpu_config}: dtype={name} ({why})", flush=True)
    cmd = [sys.executable, "pretrain.py", gpu_config, f"--data_dir={data_dir}", f"--out_dir={run_dir}",
           f"--max_iters={gpu_iters}", "--eval_interval=100000", "--eval_iters=1", "--log_interval=10",
           "--grad_accum=1", "--keep_last=1", "--overwrite=True", *gpu_args.split()]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logs = [r for r in map(json.loads, f) if "tokens_per_s" in r][1:]  # the first interval compiles
    if not logs:
        raise SystemExit(f"--gpu_iters={gpu_iters}: no log interval after the first; use at least 20")
    tok_s = sum(r["tokens_per_s"] for r in logs) / len(logs)
    mfu = sum(r["mfu"] for r in logs) / len(logs)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{gpu_config} on {where}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
          f"(steps {logs[0]['step']}..{logs[-1]['step']})")


def bench_attention():
    """Why model.Attention attends in fp32 when training on CPU: PyTorch's CPU flash-attention kernel, forward +
    backward, per dtype and sequence length (heads 4 x 32, 1536 tokens per call up to T=256)."""
    import torch.nn.functional as F
    if threads:
        torch.set_num_threads(threads)
    name, why = inference.resolve_dtype("auto", "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype=auto would be {name} ({why}); ms per "
          f"forward+backward (causal SDPA)")
    for T in (64, 256, 1024):
        row = []
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(max(1536 // T, 2), 4, T, 32, dtype=dt, requires_grad=True) for _ in range(3))
            for i in range(13):
                if i == 3:
                    t0 = time.time()
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            row.append(f"{str(dt).removeprefix('torch.')} {(time.time() - t0) / 10 * 1e3:6.2f}")
        print(f"  T={T:5d}: " + "   ".join(row))


if __name__ == "__main__":
    configurator.apply(globals(), sys.argv[1:])
    bench_attention() if attention else bench_gpu() if gpu else bench_shakespeare()
