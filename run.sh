#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus (text that ships with Python: pydoc topics and stdlib
# docstrings), on CPU, in minutes:  tokenizer -> token streams -> pretraining -> sample -> evaluation -> quantization
# -> supervised fine-tuning on the embedded instruction set -> the tuned model answering a held-out question
# -> preference pairs from an early SFT checkpoint -> DPO -> held-out reward accuracy and the same question again
# -> retrieval-augmented answers: the documents indexed in the model's tokens, retrieval figures, the question again.
# Everything goes under $RUN_DIR (default out/run). Stages that finished are not redone on a second run of this
# script unless FRESH=1; pretraining resumes from its last checkpoint if it was interrupted.
# The console gets one line per stage: its figure, read back from the files the stage wrote, and a note where the
# figure needs reading. Each stage's full output is in $RUN_DIR/logs/<stage>.log; a failing stage prints its tail.
# No --dtype here: the configs' and trainer's `auto` picks bf16 only where the hardware runs it fast.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# One thread per process: the models here are tiny, and two threads on a busy 2-core machine spin against each
# other (measured: 0.4k tok/s with 2 threads under load vs 7k tok/s with 1). Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN_DIR=${RUN_DIR:-out/run}
[ "${FRESH:-0}" = 1 ] && rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/logs"
# progress bars in the stage logs: an update every 10 s rather than ten a second
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}

# stage N NAME [DONE_FILE]: runs the function run_NAME with its output in $RUN_DIR/logs/NAME.log, then prints the
# stage's line (`figure NAME`). A DONE_FILE that exists means a finished earlier run: not redone, its log kept.
stage() {
  local log="$RUN_DIR/logs/$2.log" t0=$SECONDS rc=0 took
  printf '%-6s%-11s' "$1" "$2"
  if [ -n "${3:-}" ] && [ -f "$3" ]; then
    took="done before"
  else
    # not `( ... ) || rc=$?`: bash ignores set -e inside a command on the left of || (a failing first command
    # of a stage would go unnoticed)
    set +e
    ( set -e; "run_$2" ) > "$log" 2>&1
    rc=$?
    set -e
    took="$((SECONDS - t0))s"
    if [ $rc != 0 ]; then
      printf 'FAILED (exit %s) after %s; the end of %s:\n' $rc "$took" "$log"
      tail -n 25 "$log" | sed 's/.*\r//; s/^/    /'  # a progress bar's line: its last state
      exit $rc
    fi
  fi
  figure "$2" "$took" || echo "(no figure: the error above; the stage's output is in $log)"
}

# The figure of stage $1 and its notes, from what the stage wrote under $RUN_DIR; $2: its time.
figure() {
  python - "$RUN_DIR" "$@" <<'PY'
import json, os, re, sys
run, stage, took = sys.argv[1:]
at = lambda *p: os.path.join(run, *p)
load = lambda *p: json.load(open(at(*p), encoding="utf-8"))
short = lambda text, n=70: f'"{text if len(text) <= n else text[:n] + "..."}"'


def records(*p):  # metrics.jsonl (a line a kill cut short is skipped, as metrics.read_metrics does)
    out = []
    for line in open(at(*p), encoding="utf-8", errors="replace"):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def training(name):
    recs = records(name, "metrics.jsonl")
    val = [r for r in recs if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"])
    speed = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    log = at("logs", f"{name}.log")
    dtype = re.search(r"dtype=\S+(?: \([^)]*\))?", open(log).read()) if os.path.exists(log) else None
    return (f"val loss {val[0]['val_loss']:.3f} -> best {best['val_loss']:.3f} at step {best['step']} of "
            f"{recs[-1]['step']}" + (f", {speed[-1] / 1e3:.1f}k tok/s" if speed else "")
            + (f", {dtype.group()}" if dtype else ""))


def answer(question, reply):
    reply = " ".join(reply.split())
    return f"{short(' '.join(question.split()), 50)} -> {short(reply) if reply else '(an empty answer)'}"


notes = []
if stage == "tokenizer":
    vocab = len(load("tokenizer", "tokenizer.json")["model"]["vocab"])
    line = f"{vocab} ids (BPE, byte fallback); sentencepiece's log: {at('tokenizer', 'sentencepiece.log')}"
elif stage == "data":
    m = load("data", "meta.json")
    c = m["counts"]
    line = (f"{m['train_tokens']:,} train + {m['val_tokens']:,} val tokens; {c['kept']:,} of {c['docs_read']:,} "
            f"documents kept ({c['removed_exact_dup'] + c['removed_near_dup']} duplicates)")
elif stage in ("pretrain", "sft"):
    line = training(stage)
elif stage == "sample":
    r = load("sample.json")["results"][0]
    line = short(" ".join((r["prompt"] + r["completion"]).split()), 90)
    notes.append("a ~1M-parameter model after minutes: the words and layout of the docs, not yet their sense")
elif stage == "perplexity":
    r = load("eval_pretrain.json")["results"]["ppl"]
    line = f"held-out perplexity {r['ppl']:.2f} (loss {r['loss']:.3f}) over {r['tokens']:,} tokens"
elif stage == "quantize":
    base, q = (load(f)["results"]["ppl"]["ppl"] for f in ("eval_pretrain.json", "eval_int8.json"))
    mib = lambda *fs: sum(os.path.getsize(f) for f in fs) / 2**20
    folder = [os.path.join(at("int8"), f) for f in os.listdir(at("int8"))]
    change = round((q / base - 1) * 100, 2) + 0.0  # + 0.0: no "-0.00%"
    line = (f"int8 perplexity {q:.2f} ({change:+.2f}% over float), int8/ {mib(*folder):.1f} MiB; "
            f"model-q8_0.gguf {mib(at('model-q8_0.gguf')):.1f} MiB")
elif stage in ("answer", "dpo_answer"):
    r = load(f"{stage}.json")["results"][0]
    line = answer(r["prompt"], r["completion"])
elif stage == "dpo":
    val = [r for r in records("dpo", "metrics.jsonl") if "val_rewards/accuracies" in r]
    a, b = val[0], val[-1]
    line = (f"held-out reward accuracy {b['val_rewards/accuracies']:.2f}, margin {b['val_rewards/margins']:.3f} "
            f"at step {b['step']}; log-prob chosen {a['val_logps/chosen']:.1f} -> {b['val_logps/chosen']:.1f}, "
            f"rejected {a['val_logps/rejected']:.1f} -> {b['val_logps/rejected']:.1f}")
    rose = b["val_rewards/accuracies"] > a["val_rewards/accuracies"]
    fell = b["val_logps/chosen"] < a["val_logps/chosen"] - 0.05  # visibly, at the line's precision
    if rose and fell:
        notes.append("the accuracy rose while the chosen answers' log-prob fell: DPO rewards the gap between the "
                     "two answers, and can widen it by lowering both (both logged in dpo/metrics.jsonl)")
elif stage == "rag":
    r = load("rag_eval.json")
    line = (f"recall@1 BM25 {r['bm25/recall@1']:.2f}, re-ranked by the model {r['rerank/recall@1']:.2f} "
            f"({r['questions']} questions); answer NLL without a passage {r['nll/none']:.3f}, retrieved "
            f"{r['nll/retrieved']:.3f}, gold {r['nll/gold']:.3f}")
    if r["rerank/recall@1"] < r["bm25/recall@1"]:
        notes.append("the model's re-ranking is worse than BM25's order: a model this small is a poor judge of "
                     "relevance (rag.py's --rerank=0 keeps BM25's order)")
    if r["nll/none"] - r["nll/gold"] < 0.05:
        notes.append("the gold passage itself hardly changes the answer's NLL: this model barely uses its context, "
                     "so retrieval cannot help its answers yet, and the NLL differences are noise")
elif stage == "rag_answer":
    text = open(at("rag_answer.txt"), encoding="utf-8").read().split("\nSources:")[0]
    line = answer(open(at("question.txt"), encoding="utf-8").read(), text)
# warnings stay on the console: the stage's own ("warning: ...") and Python's ("...: UserWarning: ...")
log = at("logs", f"{stage}.log")
lines = ([w.split("\r")[-1].strip() for w in open(log, encoding="utf-8", errors="replace")]
         if os.path.exists(log) else [])
warnings = [w for w in lines if re.match(r"warning\b|\S+:\d+: \w*Warning: ", w, re.I)]
print(f"{line}  [{took}]")
for note in notes:
    print(f"{'':17}note: {note}")
for w in warnings[:3]:
    print(f"{'':17}{w[:200]}")
if len(warnings) > 3:
    print(f"{'':17}... {len(warnings) - 3} more warnings in {log}")
PY
}

run_tokenizer() { python train_tokenizer.py --vocab_size=4096 --out_dir="$RUN_DIR/tokenizer"; }

run_data() { python data_process.py --tokenizer="$RUN_DIR/tokenizer" --out_dir="$RUN_DIR/data"; }

# How a training stage into out_dir $1 from $2 starts: it resumes its checkpoints, if any; else it starts over (a run
# stopped before its first checkpoint left only its metrics.jsonl, which the trainer keeps unless told to overwrite).
start() {
  if ls "$1"/ckpt/step_* >/dev/null 2>&1; then init=(--init_from=resume)
  else init=(--init_from="$2" --overwrite=True); fi
}

run_pretrain() {  # config/pydocs.py: a small LLaMA-style model
  start "$RUN_DIR/pretrain" scratch
  python pretrain.py config/pydocs.py --data_dir="$RUN_DIR/data" --out_dir="$RUN_DIR/pretrain" "${init[@]}"
}

run_sample() {
  printf 'The for statement\nA class is\n' > "$RUN_DIR/prompts.txt"
  python eval.py --ckpt="$RUN_DIR/pretrain/hf" --task=generate --chat=False --max_new_tokens=80 \
    --data="$RUN_DIR/prompts.txt" --out="$RUN_DIR/sample.json"
}

run_perplexity() {  # held-out, in float32 so that the int8 model's figure compares with it
  python eval.py --ckpt="$RUN_DIR/pretrain/hf" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --out="$RUN_DIR/eval_pretrain.json"
}

run_quantize() {  # int8 and its perplexity; a q8_0 GGUF for llama.cpp / ollama
  python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=int8 --out="$RUN_DIR/int8"
  python eval.py --ckpt="$RUN_DIR/int8" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --out="$RUN_DIR/eval_int8.json"
  python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=gguf --gguf_type=q8_0 --out="$RUN_DIR/model-q8_0.gguf"
}

run_sft() {  # supervised fine-tuning on question -> answer records derived from the same docs
  [ -f "$RUN_DIR/sft_data/meta.json" ] || \
    python data_process.py --format=sft --tokenizer="$RUN_DIR/tokenizer" --out_dir="$RUN_DIR/sft_data" --max_len=128
  start "$RUN_DIR/sft" "$RUN_DIR/pretrain/hf"
  python fine_tuning.py "${init[@]}" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft" \
    --epochs=3 --learning_rate=1e-3 --batch_size=16 --log_interval=20
}

run_answer() {  # the fine-tuned model answers a held-out question (greedy)
  python -c "import default_data as d
print(next(r['messages'][0]['content'] for r in d.default_sft_records() if r.get('split') == 'val'))" \
    > "$RUN_DIR/question.txt"
  python eval.py --ckpt="$RUN_DIR/sft/hf" --task=generate --chat=True --temperature=0 --max_new_tokens=48 \
    --data="$RUN_DIR/question.txt" --out="$RUN_DIR/answer.json"
}

run_dpo() {  # pairs whose rejected answer comes from an early SFT checkpoint (half an epoch), then DPO
  if [ ! -f "$RUN_DIR/sft_early/hf/config.json" ]; then
    start "$RUN_DIR/sft_early" "$RUN_DIR/pretrain/hf"
    python fine_tuning.py "${init[@]}" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft_early" \
      --max_iters=35 --learning_rate=1e-3 --batch_size=16 --sample_prompts=0 --log_interval=35
  fi
  [ -f "$RUN_DIR/dpo_pairs/meta.json" ] || \
    python dpo.py --make_pairs=True --init_from="$RUN_DIR/sft_early/hf" --out_dir="$RUN_DIR/dpo_pairs" \
      --rejected_tokens=48
  start "$RUN_DIR/dpo" "$RUN_DIR/sft/hf"
  python dpo.py "${init[@]}" --data_dir="$RUN_DIR/dpo_pairs" --out_dir="$RUN_DIR/dpo" --epochs=1 \
    --learning_rate=1e-5 --log_interval=20
}

run_dpo_answer() {  # the DPO model answers the same held-out question (greedy)
  python eval.py --ckpt="$RUN_DIR/dpo/hf" --task=generate --chat=True --temperature=0 --max_new_tokens=48 \
    --data="$RUN_DIR/question.txt" --out="$RUN_DIR/dpo_answer.json"
}

run_rag() {  # the documents indexed in the model's tokens, and the retrieval figures
  python rag.py index --tokenizer="$RUN_DIR/dpo/hf" --index="$RUN_DIR/rag" --chunk_tokens=48 --overlap_tokens=8
  python rag.py eval --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --rerank=10 --top_k=1 --max_questions=200 \
    --out="$RUN_DIR/rag_eval.json"
}

run_rag_answer() {  # the held-out question answered from a retrieved passage
  python rag.py ask --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --top_k=1 --max_new_tokens=48 \
    --question="$(cat "$RUN_DIR/question.txt")" | tee "$RUN_DIR/rag_answer.txt"
}

echo "tinyllm: the whole pipeline into $RUN_DIR (each stage's full output: $RUN_DIR/logs/<stage>.log)"
stage 1/12 tokenizer "$RUN_DIR/tokenizer/tokenizer.model"
stage 2/12 data "$RUN_DIR/data/meta.json"
stage 3/12 pretrain "$RUN_DIR/pretrain/hf/config.json"
stage 4/12 sample
stage 5/12 perplexity
stage 6/12 quantize
stage 7/12 sft "$RUN_DIR/sft/hf/config.json"
stage 8/12 answer
stage 9/12 dpo "$RUN_DIR/dpo/hf/config.json"
stage 10/12 dpo_answer
stage 11/12 rag
stage 12/12 rag_answer

cat <<EOT

Done in $((SECONDS / 60))m$((SECONDS % 60))s. Where everything went:
  $RUN_DIR/logs/               each stage's full output (<stage>.log)
  $RUN_DIR/tokenizer/          tokenizer.model + tokenizer.json (transformers-loadable), sentencepiece.log
  $RUN_DIR/data/               train.bin, val.bin, meta.json (cleaning and dedup counts)
  $RUN_DIR/pretrain/           ckpt/, metrics.jsonl, loss.png, hf/ (the model, transformers format)
  $RUN_DIR/eval_pretrain.json  held-out perplexity (eval_int8.json: the same for the int8 model in int8/)
  $RUN_DIR/model-q8_0.gguf     for llama.cpp / ollama
  $RUN_DIR/sft/                the fine-tuned model (hf/), its checkpoints and held-out answers (metrics.jsonl)
  $RUN_DIR/*answer*            the held-out question (question.txt) and the answers (answer, dpo_answer, rag_answer)
  $RUN_DIR/dpo_pairs/, dpo/    preference pairs (pairs.jsonl) and the DPO-tuned model (hf/, rewards in metrics.jsonl)
  $RUN_DIR/rag/, rag_eval.json the RAG index of the embedded documents and its retrieval / answer figures
Chat with it:  .venv/bin/python chat.py --ckpt=$RUN_DIR/sft/hf
From the documents:  .venv/bin/python chat.py --ckpt=$RUN_DIR/dpo/hf --rag=$RUN_DIR/rag --rag_top_k=1
EOT
