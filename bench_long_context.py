"""One training step at a long context, full causal attention vs LongLoRA's S²-Attn (model.shifted_sparse_attention):
seconds per step and peak memory, on the same model, batch and precision.

    python bench_long_context.py --ckpt=out/long/base/hf --seq_len=1024
    python bench_long_context.py --ckpt=out/long/base/hf --seq_len=4096

The model of --ckpt is stretched to seq_len by YaRN (checkpoint.extend_context) and trained in full with AdamW on
random tokens under `dtype` autocast; the first `warmup` steps are not timed. Each side runs in a fresh process, one
after the other with `threads` threads (peak RSS is per process); "step MB" is the process's peak RSS above what it
held with the model loaded: the memory the steps themselves took.
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch

import checkpoint
import configurator
import convert
import inference
from metrics import rss_mb

ckpt = ""             # a model folder (pretrain.py's hf/)
seq_len = 1024
batch_size = 1
groups = 4            # S²-Attn groups per sequence (LongLoRA: 4)
steps = 6
warmup = 1
dtype = "auto"        # auto: bf16 where the CPU runs it fast, else float32 (inference.resolve_dtype)
threads = 1
side = ""             # internal: full | s2, the side a child process runs


def run_side():
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = convert.from_pretrained(ckpt, dtype=torch.float32)
    if seq_len > model.config.max_seq_len:
        checkpoint.extend_context(model, "yarn", seq_len)
    model.s2_groups = groups if side == "s2" else 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1))
    loaded, times = rss_mb(), []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "step_s": sum(times) / len(times), "tok_s": batch_size * seq_len * steps / sum(times),
                      "peak_rss_mb": peak, "step_mb": peak - loaded, "loss": loss.item()}))


def main():
    configurator.apply(globals(), sys.argv[1:])
    if side:
        return run_side()
    if not ckpt:
        raise SystemExit("--ckpt=FOLDER is required (a model folder, e.g. out/long/base/hf)")
    run_dtype, why = inference.resolve_dtype(dtype, "cpu")
    print(f"dtype={run_dtype} ({why})", flush=True)
    results = {}
    for name in ("full", "s2"):
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--dtype={run_dtype}", f"--side={name}"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if r.returncode:
            raise SystemExit(f"side {name} failed:\n{r.stderr[-3000:]}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{seq_len} tokens x {batch_size}, {run_dtype}, {threads} thread(s), S²-Attn {groups} groups")
    print(f"{'':<6}{'s/step':>9}{'tok/s':>9}{'peak RSS MB':>13}{'step MB':>9}")
    for name, r in results.items():
        print(f"{name:<6}{r['step_s']:>9.3f}{r['tok_s']:>9.0f}{r['peak_rss_mb']:>13.0f}{r['step_mb']:>9.0f}")
    full, s2 = results["full"], results["s2"]
    print(f"S²-Attn / full: time {s2['step_s'] / full['step_s']:.2f}x, step memory {s2['step_mb'] / full['step_mb']:.2f}x")


if __name__ == "__main__":
    main()
