"""Pretraining benchmarks (figures for BENCHMARKS.md).

    python bench_pretrain.py                 # CPU: time to val loss 1.88 on tinyshakespeare (char level),
                                             #   nanoGPT's CPU recipe vs config/shakespeare_char.py, in one run
    python bench_pretrain.py --gpu=True      # GPU: tokens/s and MFU of config/llama_124m.py (seq 1024, bf16, compiled)
    python bench_pretrain.py --attention=True --threads=1   # CPU: SDPA forward+backward, fp32 vs bf16, by length

tinyshakespeare: ids come from a plain char -> id map built here (nanoGPT's data/shakespeare_char/prepare.py does
the same; the pipeline's own char tokenizer is train_tokenizer.py --model_type=char), the last 10% of the text is
val. The baseline is a compact GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings, nanoGPT's init,
AdamW betas (0.9, 0.99), warmup 100, cosine to 1e-4, clip 1.0, fp32) trained with nanoGPT's CPU command:
4 layers, 4 heads, 128 dim, block 64, batch 12, lr 1e-3, 2000 iters. Ours runs pretrain.py with the named config.
Both models are evaluated on the same fixed val windows (eval_iters x batch_size windows of block 64, drawn by
pretrain.PretrainData.val_batch). "train" time-to-target counts training steps only (evaluation and our
checkpointing excluded from both); "wall" is everything up to the evaluation that reached the target: for ours
from launching pretrain.py (Python and torch imports included), for the reference from building its model.
"""
import gzip
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
import inference

text_path = "../shared/data/pretrain_en/tinyshakespeare/input.txt.gz"
config = "config/shakespeare_char.py"   # ours
target = 1.88                           # val loss
out_dir = "out/bench_pretrain"
ref_iters = 2000                        # nanoGPT's CPU recipe
ref_eval_interval = 50
threads = 0                             # torch threads for both runs; 0: torch's default (all cores)
gpu = False
gpu_config = "config/llama_124m.py"
gpu_iters = 60                          # the first log interval (compilation) is left out of the figure
attention = False


# ------------------------------------------------------------------------------------- nanoGPT-style reference

class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = CausalSelfAttention(d, n_head)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """GPT-2 as nanoGPT's model.py builds it (bias=False, dropout 0)."""

    def __init__(self, vocab, block, n_layer=4, n_head=4, d=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(GPTBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def train_reference(data_dir, vocab, val_batches):
    """nanoGPT's train.py loop with its CPU shakespeare_char settings. Returns the eval records."""
    torch.manual_seed(1337)
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    model = GPT(vocab, block)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    train = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (ref_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = [model(x, y).item() for x, y in val_batches]
        model.train()
        return sum(losses) / len(losses)

    records, train_time, t_start = [], 0.0, time.time()
    for it in range(ref_iters + 1):
        if it % ref_eval_interval == 0 or it == ref_iters:
            records.append({"step": it, "val_loss": val_loss(), "train_time_s": train_time,
                            "elapsed_s": time.time() - t_start})
            print(f"  reference step {it}: val {records[-1]['val_loss']:.4f} after {train_time:.1f}s of training",
                  flush=True)
        if it == ref_iters:
            break
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        ix = torch.randint(len(train) - block, (batch,))
        x = torch.stack([torch.from_numpy(train[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.time() - t0
    return records


# ------------------------------------------------------------------------------------- the benchmarks

def prepare_char_data(path, data_dir):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    os.makedirs(data_dir, exist_ok=True)
    ids[:n].tofile(os.path.join(data_dir, "train.bin"))
    ids[n:].tofile(os.path.join(data_dir, "val.bin"))
    meta = {"dtype": "uint16", "vocab_size": len(chars), "train_tokens": n, "val_tokens": len(ids) - n,
            "bos_id": None, "eos_id": None, "sources": [path], "chars": "".join(chars)}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return len(chars)


def run_dtype(config_file, device):
    """The dtype pretrain.py runs config_file in on `device`, and why: "dtype=float32 (auto: ...)"."""
    name, why = inference.resolve_dtype(configurator.load_config_file(config_file).get("dtype", "auto"), device)
    return f"dtype={name} ({why})"


def first_below(records, level):
    hit = next((r for r in records if r["val_loss"] <= level), None)
    return f"step {hit['step']:>5}  train {hit['train_time_s']:6.1f}s  wall {hit['elapsed_s']:6.1f}s" if hit \
        else "not reached"


def bench_shakespeare():
    if not os.path.isfile(text_path):
        raise SystemExit(f"{text_path}: not found (the shared data directory)")
    data_dir = os.path.join(out_dir, "data")
    vocab = prepare_char_data(text_path, data_dir)
    env = dict(os.environ)
    if threads:  # one thread is the fair setting when other work holds some of the cores
        torch.set_num_threads(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # pretrain.py's device=auto
    print(f"tinyshakespeare char-level: vocab {vocab}; ours in {run_dtype(config, device)}; "
          f"{torch.get_num_threads()} threads; load average {load:.2f} at start (other work on this machine slows "
          f"both runs)")

    # ours, through pretrain.py exactly as a user runs it
    ours_dir = os.path.join(out_dir, "ours")
    cmd = [sys.executable, "pretrain.py", config, f"--data_dir={data_dir}", f"--out_dir={ours_dir}"]
    print("ours:", " ".join(cmd), flush=True)
    if os.path.isfile(os.path.join(ours_dir, "metrics.jsonl")):
        os.remove(os.path.join(ours_dir, "metrics.jsonl"))
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    ours_wall = time.time() - t0
    with open(os.path.join(ours_dir, "metrics.jsonl")) as f:
        ours = [json.loads(line) for line in f]
    for r in ours:
        r["elapsed_s"] = r["time"] - t0  # from the launch, not from the trainer's start
    with open(os.path.join(ours_dir, "config.json")) as f:
        cfg = json.load(f)

    # the reference, on the same val windows as ours
    from data import open_data_dir
    from pretrain import PretrainData
    if cfg["block_size"] != 64:
        raise SystemExit(f"{config}: block_size must be 64, nanoGPT's, for both to be scored on the same windows")
    val = PretrainData(open_data_dir(data_dir), 64, cfg["batch_size"], cfg["seed"])
    val_batches = [val.val_batch(i) for i in range(cfg["eval_iters"])]
    print(f"reference: nanoGPT CPU recipe, {ref_iters} iters", flush=True)
    t0 = time.time()
    ref = train_reference(data_dir, vocab, val_batches)
    ref_wall = time.time() - t0

    evals = [r for r in ours if "val_loss" in r]
    end = ref[-1]["val_loss"]
    print(f"\nval windows: {cfg['eval_iters']} x {cfg['batch_size']} x 64 tokens; times exclude evaluation")
    print(f"nanoGPT CPU recipe (GPT-2, fp32, 4x128, batch 12, {ref_iters} it): final val {end:.4f} after "
          f"{ref[-1]['train_time_s']:.1f}s of training ({ref_wall:.1f}s wall)")
    print(f"tinyllm {config}: final val {evals[-1]['val_loss']:.4f} after {evals[-1]['train_time_s']:.1f}s of "
          f"training ({ours_wall:.1f}s wall, process start to exit)")
    for level, name in ((target, f"val <= {target}"), (end, f"val <= {end:.4f} (the recipe's final)")):
        print(f"time to {name}:\n  nanoGPT recipe {first_below(ref, level)}\n  tinyllm        {first_below(evals, level)}")
    print(f"load average now {os.getloadavg()[0]:.2f}")


def bench_gpu():
    if not torch.cuda.is_available():
        raise SystemExit("--gpu=True needs CUDA")
    data_dir = os.path.join(out_dir, "random_tokens")
    os.makedirs(data_dir, exist_ok=True)
    n = 50_000_000  # throughput does not care what the tokens say
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", n // 100)):
        rng.integers(0, 32000, size=size, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump({"dtype": "uint16", "vocab_size": 32000, "train_tokens": n, "val_tokens": n // 100}, f)
    run_dir = os.path.join(out_dir, "gpu")
    print(f"{gpu_config}: {run_dtype(gpu_config, 'cuda')}", flush=True)
    cmd = [sys.executable, "pretrain.py", gpu_config, f"--data_dir={data_dir}", f"--out_dir={run_dir}",
           f"--max_iters={gpu_iters}", "--eval_interval=100000", "--eval_iters=1", "--log_interval=10",
           "--grad_accum=1", "--keep_last=1"]
    print(" ".join(cmd), flush=True)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logs = [r for r in map(json.loads, f) if "tokens_per_s" in r][1:]  # the first interval compiles
    tok_s = sum(r["tokens_per_s"] for r in logs) / len(logs)
    mfu = sum(r["mfu"] for r in logs) / len(logs)
    print(f"{gpu_config} on {torch.cuda.get_device_name()}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
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
