#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus (text that ships with Python: pydoc topics and stdlib
# docstrings), on CPU, in minutes:  tokenizer -> token streams -> pretraining -> sample -> evaluation -> quantization
# -> supervised fine-tuning on the embedded instruction set -> the tuned model answering a held-out question
# -> preference pairs from an early SFT checkpoint -> DPO -> held-out reward accuracy and the same question again
# -> retrieval-augmented answers: the documents indexed in the model's tokens, retrieval figures, the question again.
# Everything goes under $RUN_DIR (default out/run). Stages that finished are not redone on a second run of this
# script unless FRESH=1; pretraining resumes from its last checkpoint if it was interrupted.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# One thread per process: the models here are tiny, and two threads on a busy 2-core machine spin against each
# other (measured: 0.4k tok/s with 2 threads under load vs 7k tok/s with 1). Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN_DIR=${RUN_DIR:-out/run}
[ "${FRESH:-0}" = 1 ] && rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
step() { printf '\n=== %s\n' "$*"; }

step "1/11 train a tokenizer (sentencepiece BPE, byte fallback) on the embedded corpus"
[ -f "$RUN_DIR/tokenizer/tokenizer.model" ] || \
  python train_tokenizer.py --vocab_size=4096 --out_dir="$RUN_DIR/tokenizer"

step "2/11 clean, dedup and tokenize the corpus into uint16 token streams"
[ -f "$RUN_DIR/data/meta.json" ] || \
  python data_process.py --tokenizer="$RUN_DIR/tokenizer" --out_dir="$RUN_DIR/data"

step "3/11 pretrain a small LLaMA-style model (config/pydocs.py)"
[ -f "$RUN_DIR/pretrain/hf/config.json" ] || {
  init=scratch; ls "$RUN_DIR"/pretrain/ckpt/step_* >/dev/null 2>&1 && init=resume
  python pretrain.py config/pydocs.py --data_dir="$RUN_DIR/data" --out_dir="$RUN_DIR/pretrain" --init_from=$init
}

step "4/11 sample from it"
python eval.py --ckpt="$RUN_DIR/pretrain/hf" --task=generate --chat=False --max_new_tokens=80 \
  --data=<(printf 'The for statement\nA class is\n')

step "5/11 evaluate: held-out perplexity"
python eval.py --ckpt="$RUN_DIR/pretrain/hf" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
  --out="$RUN_DIR/eval_pretrain.json"

step "6/11 quantize to int8 (and its perplexity), export a q8_0 GGUF for llama.cpp / ollama"
python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=int8 --out="$RUN_DIR/int8"
python eval.py --ckpt="$RUN_DIR/int8" --task=ppl --data="$RUN_DIR/data/val.bin" --dtype=float32 \
  --out="$RUN_DIR/eval_int8.json"
python quant_model.py --ckpt="$RUN_DIR/pretrain/hf" --mode=gguf --gguf_type=q8_0 --out="$RUN_DIR/model-q8_0.gguf"

step "7/11 supervised fine-tuning (fine_tuning.py) on question -> answer records derived from the same docs"
[ -f "$RUN_DIR/sft_data/meta.json" ] || \
  python data_process.py --format=sft --tokenizer="$RUN_DIR/tokenizer" --out_dir="$RUN_DIR/sft_data" --max_len=128
[ -f "$RUN_DIR/sft/hf/config.json" ] || {
  init="$RUN_DIR/pretrain/hf"; ls "$RUN_DIR"/sft/ckpt/step_* >/dev/null 2>&1 && init=resume
  python fine_tuning.py --init_from="$init" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft" \
    --epochs=3 --learning_rate=1e-3 --batch_size=16 --dtype=bfloat16 --log_interval=20
}

step "8/11 the fine-tuned model answers a held-out question (greedy)"
question=$(python -c "import json, default_data as d; print(next(r['messages'][0]['content'] for r in d.default_sft_records() if r.get('split') == 'val'))")
echo "$question" > "$RUN_DIR/question.txt"
python eval.py --ckpt="$RUN_DIR/sft/hf" --task=generate --chat=True --temperature=0 --max_new_tokens=48 \
  --data="$RUN_DIR/question.txt"

step "9/11 DPO: pairs whose rejected answer comes from an early SFT checkpoint (half an epoch), then dpo.py"
[ -f "$RUN_DIR/sft_early/hf/config.json" ] || \
  python fine_tuning.py --init_from="$RUN_DIR/pretrain/hf" --data_dir="$RUN_DIR/sft_data" --out_dir="$RUN_DIR/sft_early" \
    --max_iters=35 --learning_rate=1e-3 --batch_size=16 --dtype=bfloat16 --sample_prompts=0 --log_interval=35
[ -f "$RUN_DIR/dpo_pairs/meta.json" ] || \
  python dpo.py --make_pairs=True --init_from="$RUN_DIR/sft_early/hf" --out_dir="$RUN_DIR/dpo_pairs" --rejected_tokens=48
[ -f "$RUN_DIR/dpo/hf/config.json" ] || {
  init="$RUN_DIR/sft/hf"; ls "$RUN_DIR"/dpo/ckpt/step_* >/dev/null 2>&1 && init=resume
  python dpo.py --init_from="$init" --data_dir="$RUN_DIR/dpo_pairs" --out_dir="$RUN_DIR/dpo" --epochs=1 \
    --learning_rate=1e-5 --dtype=bfloat16 --log_interval=20
}
python - "$RUN_DIR/dpo/metrics.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_rewards/accuracies" in r]
for r in (evals[0], evals[-1]):
    print(f"step {r['step']}: held-out reward accuracy {r['val_rewards/accuracies']:.3f}, "
          f"margin {r['val_rewards/margins']:.3f}, chosen log-prob {r['val_logps/chosen']:.2f}")
PY

step "10/11 the DPO model answers the same held-out question (greedy)"
python eval.py --ckpt="$RUN_DIR/dpo/hf" --task=generate --chat=True --temperature=0 --max_new_tokens=48 \
  --data="$RUN_DIR/question.txt"

step "11/11 RAG (rag.py): the documents indexed in the model's tokens, retrieval figures, the question from a passage"
python rag.py index --tokenizer="$RUN_DIR/dpo/hf" --index="$RUN_DIR/rag" --chunk_tokens=48 --overlap_tokens=8
python rag.py eval --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --rerank=10 --top_k=1 --max_questions=200 \
  --out="$RUN_DIR/rag_eval.json"
python rag.py ask --index="$RUN_DIR/rag" --ckpt="$RUN_DIR/dpo/hf" --top_k=1 --max_new_tokens=48 \
  --question="$(cat "$RUN_DIR/question.txt")"

cat <<EOT

Done. Where everything went:
  $RUN_DIR/tokenizer/          tokenizer.model + tokenizer.json (transformers-loadable)
  $RUN_DIR/data/               train.bin, val.bin, meta.json (cleaning and dedup counts)
  $RUN_DIR/pretrain/           ckpt/, metrics.jsonl, loss.png, hf/ (the model, transformers format)
  $RUN_DIR/eval_pretrain.json  held-out perplexity (eval_int8.json: the same for the int8 model in int8/)
  $RUN_DIR/model-q8_0.gguf     for llama.cpp / ollama
  $RUN_DIR/sft/                the fine-tuned model (hf/), its checkpoints and held-out answers (metrics.jsonl)
  $RUN_DIR/dpo_pairs/, dpo/    preference pairs (pairs.jsonl) and the DPO-tuned model (hf/, rewards in metrics.jsonl)
  $RUN_DIR/rag/, rag_eval.json the RAG index of the embedded documents and its retrieval / answer figures
Chat with it:  .venv/bin/python chat.py --ckpt=$RUN_DIR/sft/hf
From the documents:  .venv/bin/python chat.py --ckpt=$RUN_DIR/dpo/hf --rag=$RUN_DIR/rag --rag_top_k=1
EOT
