"""The table at the end of run.sh: each stage's wall time and figures, read back from the files the stage wrote
(metrics.jsonl, meta.json, eval.py's and rag.py's --out JSON), never typed in; printed, and written to
<run_dir>/results.md and results.json with the machine, the torch version and the git commit.

    python results.py out/run_zh zh tokenizer data pretrain ...     # run.sh's last step: run dir, pipeline, stages

A stage's time is logs/<stage>.seconds, written by run.sh when the stage ran; one finished by an earlier run keeps
that run's time and is marked "done before" (RUN_START, the epoch second this run.sh started, tells them apart).
"""
import datetime
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version

import numpy as np


def records(path):
    """metrics.jsonl's records (a line a kill cut short is skipped, as metrics.read_metrics does)."""
    out = []
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def unigram_entropy(bin_path, dtype):
    """Entropy in nats of the token frequencies of a token file: the loss of a model that ignores all context."""
    counts = np.bincount(np.fromfile(bin_path, dtype=dtype)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def short(text, n=40):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def figures(run, stage):
    """{name: value} of one stage, from its files under `run`."""
    at = lambda *p: os.path.join(run, *p)
    load = lambda *p: json.load(open(at(*p), encoding="utf-8"))
    if stage == "tokenizer":
        out = {"vocab": len(load("tokenizer", "tokenizer.json")["model"]["vocab"])}
        if os.path.exists(at("tokenizer", "heldout.json")):  # bash run.sh zh: measured on held-out documents
            h = load("tokenizer", "heldout.json")
            out["chars/token (held out)"] = round(h["ours"]["chars_per_token"], 3)
            if "smollm2" in h:
                out[f"SmolLM2's ({h['smollm2']['vocab_size']} ids)"] = round(h["smollm2"]["chars_per_token"], 3)
        elif os.path.exists(at("data", "val.bin")):  # the English run: over the val split's text
            from tokenizer import Tokenizer
            ids = np.fromfile(at("data", "val.bin"), dtype=load("data", "meta.json")["dtype"])
            out["chars/token (val.bin)"] = round(len(Tokenizer.from_pretrained(at("tokenizer")).decode(ids.tolist(),
                                                                                 skip_special=True)) / len(ids), 3)
        return out
    if stage == "data":
        m = load("data", "meta.json")
        c = m["counts"]
        return {"train tokens": m["train_tokens"], "val tokens": m["val_tokens"],
                "documents kept": f"{c['kept']} of {c['docs_read']}",
                "duplicates": c.get("removed_exact_dup", 0) + c.get("removed_near_dup", 0)}  # counts omit zeros
    if stage == "pretrain":
        recs = records(at("pretrain", "metrics.jsonl"))
        val = [r for r in recs if "val_loss" in r]
        speed = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
        out = {"val loss": round(min(r["val_loss"] for r in val), 4)}
        bpb = [r["val_bpb"] for r in val if "val_bpb" in r]
        if bpb:
            out["val bits/byte"] = round(min(bpb), 4)
        out["unigram entropy"] = round(unigram_entropy(at("data", "train.bin"), load("data", "meta.json")["dtype"]), 4)
        if speed:
            out["tokens/s"] = round(float(np.median(speed)))
        return out
    if stage == "perplexity":
        r = load("eval_pretrain.json")["results"]["ppl"]
        return {"held-out perplexity": round(r["ppl"], 3), "tokens": r["tokens"]}
    if stage == "quantize":
        base = load("eval_pretrain.json")["results"]["ppl"]["ppl"]
        out = {}
        for name, path in (("int8", "eval_int8.json"), ("q8_0", "eval_q8_0.json")):
            if os.path.exists(at(path)):
                change = round((load(path)["results"]["ppl"]["ppl"] / base - 1) * 100, 2) + 0.0  # + 0.0: no "-0.00"
                out[f"{name} perplexity change"] = f"{change:+.2f}%"
        return out
    if stage == "sft":
        val = [r for r in records(at("sft", "metrics.jsonl")) if "val_loss" in r]
        return {"held-out answer loss": f"{val[0]['val_loss']:.3f} -> {val[-1]['val_loss']:.3f}"}
    if stage == "dpo":
        val = [r for r in records(at("dpo", "metrics.jsonl")) if "val_rewards/accuracies" in r]
        return {"held-out reward accuracy": round(val[-1]["val_rewards/accuracies"], 3),
                "margin": round(val[-1]["val_rewards/margins"], 4),
                "held-out pairs": load("dpo_pairs", "meta.json")["val_records"]}
    if stage == "ceval":
        r = load("ceval.json")["results"]["all"]
        return {"C-Eval accuracy": round(r["acc"], 4), "chance": 0.25, "questions": r["n"]}
    if stage == "rag":
        r = load("rag_eval.json")
        out = {"recall@5 BM25": round(r["bm25/recall@5"], 3)}
        if "rerank/recall@5" in r:
            out["re-ranked by the model"] = round(r["rerank/recall@5"], 3)
        # gap closed: (NLL without a passage - with the retrieved) / (without - with the gold one); None where the
        # gold passage does not lower the answer's NLL at all
        out["answer NLL gap closed"] = None if r.get("gap_closed") is None else round(r["gap_closed"], 3)
        return {**out, "questions": r["questions"]}
    if stage in ("sample", "answer", "dpo_answer"):
        r = load(f"{stage}.json")["results"][0]
        return {"text": short(r["prompt"] + r["completion"]) if stage == "sample" else
                f"{short(r['prompt'], 20)} -> {short(r['completion'])}"}
    if stage == "rl":
        recs = records(at("rl", "metrics.jsonl"))
        evals = [r["eval_pass@1"] for r in recs if "eval_pass@1" in r]
        rewards = [r["reward"] for r in recs if "reward" in r]
        return {"held-out exact match": f"{evals[0]:.3f} -> {evals[-1]:.3f}", "reward": f"{rewards[0]:.3f} -> {rewards[-1]:.3f}"}
    if stage == "serve":
        r = load("serve.json")
        return {"text": short(r["choices"][0]["message"]["content"]), "prompt tokens": r["usage"]["prompt_tokens"],
                "completion tokens": r["usage"]["completion_tokens"]}
    if stage == "rag_answer":
        text = open(at("rag_answer.txt"), encoding="utf-8").read()
        answer, _, sources = text.partition("\nSources:")
        return {"text": short(answer), "source": short(sources, 60)}
    return {}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               None) if os.path.exists("/proc/cpuinfo") else None
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def table(run, pipeline, stages, run_start):
    rows = []
    for stage in stages:
        seconds_file = os.path.join(run, "logs", f"{stage}.seconds")
        seconds = int(open(seconds_file).read()) if os.path.exists(seconds_file) else None
        before = seconds is not None and os.path.getmtime(seconds_file) < run_start
        try:
            figs = figures(run, stage)
        except (OSError, KeyError, IndexError, ValueError) as e:
            figs = {"error": f"no figure ({type(e).__name__}: {e})"}
        rows.append({"stage": stage, "seconds": seconds, "done_before": before, "figures": figs})
    return {"pipeline": pipeline, "run_dir": run, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "machine": machine(), "torch": version("torch"), "commit": commit(), "stages": rows}


def markdown(res):
    cell = lambda figs: "; ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {'n/a' if v is None else v}"
                                  for k, v in figs.items())
    time = lambda r: ("-" if r["seconds"] is None else
                      f"{r['seconds']}s" + (" (done before)" if r["done_before"] else ""))
    lines = [f"Run {res['run_dir']} ({res['pipeline']}), {res['date']}: {res['machine']}; torch {res['torch']}; "
             f"commit {res['commit']}", "", "| stage | time | figures |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {time(r)} | {cell(r['figures']).replace('|', '/')} |" for r in res["stages"]]
    total = sum(r["seconds"] or 0 for r in res["stages"])
    return "\n".join(lines + [f"| total | {total // 60}m{total % 60:02d}s | |"]) + "\n"


def main():
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip())
        return
    if len(sys.argv) < 4:
        raise SystemExit("usage: python results.py RUN_DIR PIPELINE STAGE [STAGE ...] (--help: what it does)")
    if not os.path.isdir(os.path.join(sys.argv[1], "logs")):
        raise SystemExit(f"{sys.argv[1]}: not a run.sh run folder (it has no logs/)")
    run, pipeline, stages = sys.argv[1], sys.argv[2], sys.argv[3:]
    res = table(run, pipeline, stages, float(os.environ.get("RUN_START", 0)))
    md = markdown(res)
    with open(os.path.join(run, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, ensure_ascii=False, indent=1)
    with open(os.path.join(run, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md, end="")


if __name__ == "__main__":
    main()
