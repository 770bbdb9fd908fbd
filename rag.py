"""Answer questions from local documents: chunks sized in the model's tokens, BM25 retrieval (Chinese cut into words
by jieba), an optional re-ranking by the model's own likelihood, and answers from a prompt that fits its context.

    python rag.py index --docs=notes/,faq.jsonl --tokenizer=out/run/sft/hf --index=out/rag
    python rag.py ask --index=out/rag --ckpt=out/run/sft/hf --question="What does the keyword yield do?"
    python rag.py eval --index=out/rag --ckpt=out/run/sft/hf --questions=qa.jsonl --out=rag_eval.json
    python chat.py --ckpt=out/run/sft/hf --rag=out/rag --rag_rerank=10   # every message answered from passages

index: documents are read by readers.py (text files whole unless --txt_split says otherwise, jsonl/json/csv by
--text_field; gz; inside folders only the extensions readers.py knows, the others named on stderr) or, without
--docs, the embedded default documents. Each is cut into chunks of at most chunk_tokens tokens of --tokenizer (the
model's folder or .gguf), consecutive chunks sharing about overlap_tokens, cut at word (Chinese: character)
boundaries and preferably after a sentence. The folder holds index.json (settings,
tokenizer checksum, files and their sha256), chunks.jsonl (source, line, character span, text) and bm25/ (bm25s).
Indexing again mirrors --docs: unchanged files keep their chunks, changed files are re-chunked, files no longer
named are dropped. An index of other settings or a model with another tokenizer is refused; so is a damaged index,
which indexing again builds anew.
ask: the top_k chunks (after re-ranking the best `rerank` BM25 hits by log p(question | chunk), UPR: Sachan et
al. 2022, when rerank > 0) go into the user message, as many as fit the context with the question and the reply
(the last one shortened to fit); the answer is printed with the sources it was given (an empty one is said to be).
eval: on questions whose source is known (JSON Lines {question, answer, source: "path" or "path:line"}; without
--questions: the embedded question set, on an index of the embedded documents), recall@1/@5 and MRR@10 of BM25
and of BM25 + re-ranking, and with --ckpt the reference answer's mean per-token NLL with no context, with the
retrieved context and with the gold source's chunks.
"""
import functools
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time

import torch

import configurator
import inference
import readers
from tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------- config
index = "out/rag"     # the index folder
docs = ""             # index: comma-separated files, folders, globs ("" = the embedded default documents)
text_field = "text"   # index: the field/column of jsonl, json and csv records (readers.py)
txt_split = "file"    # index: a text file is one document (or line, blank, a separator line: readers.py)
encoding = "utf-8"
tokenizer = ""        # index: whose tokens size the chunks: the model's folder or .gguf, or a tokenizer folder
chunk_tokens = 128    # index: at most this many tokens per chunk
overlap_tokens = 24   # index: about this many tokens shared by consecutive chunks
ckpt = ""             # ask, eval: the model (any checkpoint inference.load_model reads)
question = ""         # ask
questions = ""        # eval: JSON Lines of {question, answer, source} ("" = the embedded question set)
max_questions = 100   # eval: this many questions, evenly spaced over the set (0 = all)
out = ""              # eval: also write the results to this JSON file
top_k = 3             # chunks given to the model
rerank = 0            # re-rank the best this many BM25 hits by the model's likelihood (0 = BM25 order)
system = ""           # ask: system prompt
max_new_tokens = 128
temperature = 0.0     # 0 = greedy
no_repeat_ngram_size = 0  # ask: never repeat an n-gram of this size, the prompt's included (0 = off)
# (small models loop without it; as in transformers the prompt's n-grams count, so no n tokens of a passage are quoted)
device = "cpu"
dtype = "auto"        # auto: bfloat16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
seed = 1337
# -----------------------------------------------------------------------------------------------------------

FORMAT = "tinyllm-rag/1"
SETTINGS = ("chunk_tokens", "overlap_tokens", "text_field", "txt_split", "encoding")
DEFAULT_SOURCE = "<default documents>"
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# A piece is a word with the whitespace before it (as byte-level BPE splits text) or a single CJK character/mark.
_PIECE = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)|\s+")
_SENTENCE_END = re.compile(r"[.!?。！？;；:：]$|\n\s*$")
_TERM = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+|[^\W\u3400-\u4dbf\u4e00-\u9fff]+")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


# ----------------------------------------------------------------------------- chunks

def chunk_spans(text, tok, chunk_tokens, overlap_tokens):
    """[(start, end)] character spans covering `text` in order, each at most chunk_tokens tokens, each after the
    first starting at most about overlap_tokens tokens before the previous one ends (at a piece boundary)."""
    pieces, counts = _pieces(text, tok, chunk_tokens)
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    spans, i = [], 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and total + counts[j] <= chunk_tokens:
            total, j = total + counts[j], j + 1
        if j < len(pieces):  # end after the last sentence in the chunk's second half, if there is one
            half, run = None, 0
            for m in range(i, j):
                run += counts[m]
                if run >= chunk_tokens // 2 and _SENTENCE_END.search(pieces[m]):
                    half = m + 1
            j = half or j
        while j > i + 1 and len(tok.encode(text[offsets[i]:offsets[j]])) > chunk_tokens:
            j -= 1  # the pieces' own counts can differ from the count of their concatenation
        spans.append((offsets[i], offsets[j]))
        if j == len(pieces):
            break
        k, back = j, 0
        while k - 1 > i and back + counts[k - 1] <= overlap_tokens:
            back, k = back + counts[k - 1], k - 1
        i = k
    return spans


def _pieces(text, tok, limit):
    """The text's pieces (they join to the text) and their token counts, pieces of more than `limit` tokens cut."""
    pieces, counted = _PIECE.findall(text), []
    for piece, ids in zip(pieces, tok.encode_batch(pieces) if pieces else []):
        counted += [(piece, len(ids))] if len(ids) <= limit else _halves(piece, tok, limit)
    return [p for p, _ in counted], [n for _, n in counted]


def _halves(piece, tok, limit):
    """[(part, count)]: a piece of more than `limit` tokens (a URL, a hash, a run of emoji) cut in halves until
    each fits."""
    n = len(tok.encode(piece))
    if n <= limit or len(piece) == 1:
        return [(piece, n)]
    half = len(piece) // 2
    return _halves(piece[:half], tok, limit) + _halves(piece[half:], tok, limit)


def terms(text):
    """The words BM25 matches on: lower-cased words without English stopwords; runs of Chinese cut by jieba."""
    jieba, stop_en, stop_zh = _segmenter()
    out = []
    for m in _TERM.finditer(text.lower()):
        word = m.group()
        if _HAN.match(word):
            out += [w for w in jieba.lcut(word) if w not in stop_zh]
        elif word not in stop_en:
            out.append(word)
    return out


@functools.cache
def _segmenter():
    """jieba (quiet: not its "Building prefix dict" lines) and bm25s's English and Chinese stopwords as sets."""
    import logging

    import jieba
    from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN
    jieba.setLogLevel(logging.WARNING)
    return jieba, frozenset(STOPWORDS_EN), frozenset(STOPWORDS_CHINESE)


# ----------------------------------------------------------------------------- the index

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _documents(path, settings):
    """(line, text) of each document of one file (or of the embedded default documents)."""
    if path == DEFAULT_SOURCE:
        import default_data
        yield from enumerate(default_data.default_documents(), 1)
        return
    fields = settings["text_field"].split(",")
    for value, _, line in readers.iter_records([path], settings, readers.Issues(False), {}):
        try:
            yield line, readers.record_text(value, fields)
        except ValueError as e:
            raise SystemExit(f"{path}:{line}: {e}") from None


def _default_fingerprint():
    import default_data
    return hashlib.sha256("\0".join(default_data.default_documents()).encode()).hexdigest()


def build_index(folder, spec, tok, settings, tokenizer_path=""):
    """Index the documents of `spec` ("" = the embedded ones) into `folder`, reusing the chunks of files whose
    sha256 is unchanged; returns {"kept", "chunked", "dropped", "chunks"} (lists of paths, a count)."""
    readers.check_options(settings["txt_split"], settings["encoding"])
    if settings["chunk_tokens"] < 16 or not 0 <= settings["overlap_tokens"] < settings["chunk_tokens"] // 2:
        raise SystemExit(f"chunk_tokens={settings['chunk_tokens']} must be at least 16 and overlap_tokens="
                         f"{settings['overlap_tokens']} at least 0 and less than half of it")
    files, skipped = readers.expand_inputs(spec) if spec else ([DEFAULT_SOURCE], [])
    if skipped:  # binary files, names readers.py does not read (or README, LICENSE, SOURCE.json) inside the folders
        print(f"{spec}: {readers.skipped_summary(skipped)}", file=sys.stderr)
    try:
        old = Index.open(folder, tok, settings) if os.path.exists(os.path.join(folder, "index.json")) else None
    except DamagedIndex as e:  # another tokenizer or other settings stay refused: the user must choose
        print(f"{e}: building it anew", file=sys.stderr)
        old = None
    kept, chunked, chunks, fingerprints, old_chunks = [], [], [], {}, {}
    for c in old.chunks if old else []:
        old_chunks.setdefault(c["source"], []).append(c)
    for path in files:
        fingerprints[path] = _default_fingerprint() if path == DEFAULT_SOURCE else _sha256(path)
        if old is not None and old.meta["files"].get(path) == fingerprints[path]:
            chunks += old_chunks.get(path, [])
            kept.append(path)
            continue
        chunked.append(path)
        before, shown = len(chunks), time.time()
        for n, (line, text) in enumerate(_documents(path, settings), 1):
            for start, end in chunk_spans(text, tok, settings["chunk_tokens"], settings["overlap_tokens"]):
                chunks.append({"source": path, "line": line, "start": start, "end": end, "text": text[start:end]})
            if time.time() - shown > 30:
                print(f"{path}: {n} documents so far", flush=True)
                shown = time.time()
        print(f"{path}: {len(chunks) - before} chunks", flush=True)
    dropped = sorted(set(old.meta["files"]) - set(files)) if old else []
    report = {"kept": kept, "chunked": chunked, "dropped": dropped, "chunks": len(chunks)}
    if old is not None and not chunked and not dropped:
        return report  # nothing changed: the folder stays as it is, byte for byte
    if not chunks:
        raise SystemExit(f"{spec or DEFAULT_SOURCE}: no text to index")
    _write(folder, chunks, {"format": FORMAT, "tokenizer": tok.checksum(), "tokenizer_path": tokenizer_path,
                            **settings, "files": fingerprints})
    return report


def _write(folder, chunks, meta):
    """Write the index into a new folder beside `folder`, then put it in place: a crash never leaves a half-written
    index where `folder` is."""
    import bm25s
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    body = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks).encode()
    with open(os.path.join(tmp, "chunks.jsonl"), "wb") as f:
        f.write(body)
    retriever = bm25s.BM25()
    retriever.index([terms(c["text"]) for c in chunks], show_progress=False)
    retriever.save(os.path.join(tmp, "bm25"), show_progress=False)
    bm25_dir = os.path.join(tmp, "bm25")
    bm25_files = {name: _sha256(os.path.join(bm25_dir, name)) for name in sorted(os.listdir(bm25_dir))}
    meta = {**meta, "chunks": len(chunks), "chunks_sha256": hashlib.sha256(body).hexdigest(), "bm25": bm25_files}
    with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.rename(tmp, folder)


class DamagedIndex(SystemExit):
    """An index folder whose files are unreadable, cut short or changed: `rag.py index` builds it anew."""


REBUILD = "python rag.py index with the same --docs builds it anew"


class Index:
    """A rag.py index folder: .chunks (dicts: source, line, start, end, text), .search(question, k)."""

    def __init__(self, folder, meta, chunks, retriever):
        self.folder, self.meta, self.chunks, self.retriever = folder, meta, chunks, retriever

    @classmethod
    def open(cls, folder, tok=None, settings=None):
        """Load and check an index: a damaged one, one built with another tokenizer than `tok` or with other
        `settings` stops with a message saying so."""
        import bm25s
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{folder}: not a rag.py index (no index.json): build one with python rag.py index")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
            with open(os.path.join(folder, "chunks.jsonl"), "rb") as f:
                body = f.read()
        except (OSError, ValueError) as e:
            raise DamagedIndex(f"{folder}: damaged index ({e}); {REBUILD}") from None
        needed = ("tokenizer", "tokenizer_path", "files", "chunks_sha256", "bm25", *SETTINGS)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(k in meta for k in needed):
            raise DamagedIndex(f"{path}: not a {FORMAT} index, or a damaged one; {REBUILD}")
        if hashlib.sha256(body).hexdigest() != meta.get("chunks_sha256"):
            raise DamagedIndex(f"{folder}/chunks.jsonl does not match index.json (changed or cut short); {REBUILD}")
        if tok is not None and tok.checksum() != meta["tokenizer"]:
            raise SystemExit(f"{folder} was built with another tokenizer ({meta['tokenizer_path'] or 'unnamed'}) "
                             f"than this model's: its chunks are sized in other tokens; index again with "
                             f"--tokenizer=<this model> into another folder")
        changed = [f"{k}={meta[k]!r} (now {settings[k]!r})" for k in SETTINGS if settings and meta[k] != settings[k]]
        if changed:
            raise SystemExit(f"{folder} was built with {', '.join(changed)}: index into another folder, or delete "
                             f"this one to rebuild it")
        for name, digest in meta["bm25"].items():  # bm25s's loader has no checks of its own
            path = os.path.join(folder, "bm25", name)
            if not os.path.isfile(path) or _sha256(path) != digest:
                raise DamagedIndex(f"{path}: missing or changed since the index was built; {REBUILD}")
        chunks = [json.loads(line) for line in body.decode().splitlines()]
        return cls(folder, meta, chunks, bm25s.BM25.load(os.path.join(folder, "bm25"), show_progress=False))

    def search(self, question, k):
        """The best k chunks by BM25 that share a word with the question, as [(chunk, score)], best first."""
        query = terms(question)
        if not query:
            return []
        ids, scores = self.retriever.retrieve([query], k=min(k, len(self.chunks)), show_progress=False)
        return [(self.chunks[i], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]


def where(chunk):
    """`source:line [start:end]`: a chunk's place, for printing the sources of an answer."""
    return f"{chunk['source']}:{chunk['line']} [{chunk['start']}:{chunk['end']}]"


# ----------------------------------------------------------------------------- the model's part

def rerank_hits(model, tok, question, hits):
    """hits re-ordered by the model's log p(question | chunk) after UPR's prompt (Sachan et al. 2022: a passage is
    relevant when it makes the question likely), as [(chunk, log-prob)], best first."""
    if not hits:
        return []
    q = tok.encode(" " + question.strip())[:model.config.max_seq_len // 2]
    ask = tok.encode("\nPlease write a question based on this passage.\nQuestion:")
    passages = [tok.encode("Passage: " + c["text"])[:model.config.max_seq_len - len(ask) - len(q)] for c, _ in hits]
    logp = -continuation_nll(model, [p + ask for p in passages], q)
    order = sorted(range(len(hits)), key=lambda b: -logp[b].item())
    return [(hits[b][0], logp[b].item()) for b in order]


def user_message(question, passages):
    """The user turn: the question after the numbered passages (just the question when there are none)."""
    if not passages:
        return question
    context = "\n\n".join(f"[{n}] {p.strip()}" for n, p in enumerate(passages, 1))
    return f"Answer the question using the context.\n\nContext:\n{context}\n\nQuestion: {question}"


def fit_context(tok, question, passages, budget, system=""):
    """The passages, in order, that fit with the question into `budget` prompt tokens: whole ones while they fit,
    then the next one shortened to the room left. A question that does not fit alone is a ValueError."""
    def size(texts):
        messages = [{"role": "user", "content": user_message(question, texts)}]
        return len(tok.encode(inference.render_chat(tok, messages, system)))

    if size([]) > budget:
        raise ValueError(f"the question takes {size([])} tokens of prompt, more than the {budget} it may use")
    used = []
    for text in passages:
        if size(used + [text]) <= budget:
            used.append(text)
            continue
        lo, hi = 0, len(text)  # the longest prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(used + [text[:mid]]) <= budget else (lo, mid - 1)
        used += [text[:lo]] if text[:lo].strip() else []
        break
    return used


def retrieve(index, model, tok, question, k, rerank_n):
    """The top k chunks for a question: BM25, re-ranked by the model when rerank_n > 0."""
    hits = index.search(question, max(k, rerank_n))
    return [c for c, _ in (rerank_hits(model, tok, question, hits) if rerank_n else hits)][:k]


def rag_messages(tok, question, chunks, budget, system="", history=()):
    """(messages, chunks used): the question with as many chunks as fit within `budget` prompt tokens, after as
    much of the conversation so far as still fits (the question comes first, then its passages, then history)."""
    texts = fit_context(tok, question, [c["text"] for c in chunks], budget, system)
    turn = {"role": "user", "content": user_message(question, texts)}
    return inference.fit_history(tok, list(history) + [turn], system, budget), chunks[:len(texts)]


def answer_nll(model, tok, prompts, answer):
    """The reference answer's mean per-token NLL after each prompt text (a batch)."""
    a = tok.encode(answer)
    return (continuation_nll(model, [tok.encode(p) for p in prompts], a) / len(a)).tolist()


@torch.inference_mode()
def continuation_nll(model, prefixes, continuation):
    """(B,) summed NLL of the token ids `continuation` after each list of ids in `prefixes` (one padded batch)."""
    idx, _ = inference.pad_right([p + continuation for p in prefixes], inference.device_of(model))
    targets = torch.full_like(idx, -100)
    for b, p in enumerate(prefixes):  # position t predicts token t + 1
        targets[b, len(p) - 1:len(p) - 1 + len(continuation)] = torch.tensor(continuation)
    return model(idx, targets, reduction="none")[1].sum(1)


# ----------------------------------------------------------------------------- evaluation

def default_questions():
    """The embedded question set (default_data's instruction records) with the embedded documents that hold each
    answer as sources ("<default documents>:N", whitespace ignored)."""
    import bisect

    import default_data
    docs = [" ".join(d.split()) for d in default_data.default_documents()]
    starts, pos = [], 0
    for d in docs:
        starts.append(pos)
        pos += len(d) + 1
    joined, out = "\0".join(docs), []
    for rec in default_data.default_sft_records():
        q, a = (m["content"] for m in rec["messages"])
        found, at = set(), joined.find(a)
        while at >= 0:
            found.add(bisect.bisect_right(starts, at))  # document numbers count from 1, as lines do
            at = joined.find(a, at + 1)
        if found:
            out.append({"question": q, "answer": a, "source": [f"{DEFAULT_SOURCE}:{n}" for n in sorted(found)]})
    return out


def load_questions(path):
    """The questions of a JSON Lines file ({question, answer, source}), or the embedded ones for "" ."""
    if not path:
        return default_questions()
    out = []
    for at, rec in readers.read_jsonl(path):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec[k] for k in ("question",
                                                                                                 "answer")):
            raise SystemExit(f"{at}: expected {{question, answer, source}} with non-empty question and answer")
        if not rec.get("source"):
            raise SystemExit(f"{at}: no source: eval needs the file (or file:line) each question comes from")
        out.append(rec)
    return out


def _is_gold(chunk, sources):
    """Whether a chunk comes from one of `sources` ("path" or "path:line"; paths compared normalised)."""
    path = os.path.normpath(chunk["source"])
    return any(os.path.normpath(s) in (path, f"{path}:{chunk['line']}") for s in sources)


def evaluate(index, qs, model=None, tok=None, k=3, rerank_n=10, system=""):
    """Retrieval (recall@1, recall@5, MRR@10 of BM25, and of BM25 + re-ranking with a model) and, with a model, the
    reference answers' mean per-token NLL with no, retrieved and gold context (over the questions whose answer fits
    the model's context with the question: nll_questions) and the share of the gold context's gain the retrieved
    one gets (gap_closed; None where that gain is within two standard errors, nll/gold_gain_se, of zero)."""
    sums, n, scored, t0, shown, gains = {}, len(qs), 0, time.time(), time.time(), []
    rankers = ["bm25"] + (["rerank"] if model is not None and rerank_n else [])
    for i, q in enumerate(qs):
        sources = [q["source"]] if isinstance(q["source"], str) else q["source"]
        hits = index.search(q["question"], max(10, rerank_n))
        ranked = {"bm25": [c for c, _ in hits]}
        if "rerank" in rankers:
            top = rerank_hits(model, tok, q["question"], hits[:rerank_n])
            ranked["rerank"] = [c for c, _ in top] + ranked["bm25"][rerank_n:]
        for name in rankers:
            rank = next((r for r, c in enumerate(ranked[name][:10], 1) if _is_gold(c, sources)), None)
            for key, value in [("recall@1", rank == 1), ("recall@5", bool(rank and rank <= 5)),
                               ("mrr@10", 1 / rank if rank else 0.0)]:
                sums[f"{name}/{key}"] = sums.get(f"{name}/{key}", 0.0) + value
        if model is not None:
            budget = model.config.max_seq_len - len(tok.encode(q["answer"]))
            gold = [c for c in index.chunks if _is_gold(c, sources)]
            try:
                prompts = [inference.render_chat(tok, rag_messages(tok, q["question"], chunks, budget, system)[0],
                                                 system) for chunks in ([], ranked[rankers[-1]][:k], gold)]
            except ValueError:  # question and answer alone pass the context: counted out of nll_questions
                prompts = []
            nlls = answer_nll(model, tok, prompts, q["answer"]) if prompts else []
            for name, nll in zip(("nll/none", "nll/retrieved", "nll/gold"), nlls):
                sums[name] = sums.get(name, 0.0) + nll
            gains += [nlls[0] - nlls[2]] if nlls else []
            scored += bool(prompts)
        if time.time() - shown > 30 or i + 1 == n:
            shown = time.time()
            print(f"eval {i + 1}/{n} questions, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    result = {key: value / (scored if key.startswith("nll/") else n) for key, value in sums.items()}
    if scored:
        result["nll_questions"] = scored
        gap = result["nll/none"] - result["nll/gold"]
        # a ratio only where the gold passages help beyond the noise: two standard errors of the per-question gains
        # (a model that cannot use its context yet has gains of either sign, and their ratio means nothing)
        se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("inf")
        result["nll/gold_gain_se"] = se if len(gains) > 1 else None
        result["gap_closed"] = (result["nll/none"] - result["nll/retrieved"]) / gap if gap > 2 * se else None
    return {"questions": n, **result}


# ----------------------------------------------------------------------------- the command line

def _load(index_dir):
    run_dtype, why = inference.resolve_dtype(dtype, device)
    print(f"dtype={run_dtype} ({why})", file=sys.stderr)  # stderr: eval's stdout is its JSON
    model, tok = inference.load_model(ckpt, device, run_dtype)
    return model, tok, Index.open(index_dir, tok)


def check_numbers():
    """Stop on a count out of its range, naming the key and the range, before any index or model is read."""
    for key, low, accepted in (("top_k", 1, "1 or more"), ("rerank", 0, "0 (BM25 order) or more"),
                               ("max_questions", 0, "0 (all) or more"), ("max_new_tokens", 1, "1 or more"),
                               ("no_repeat_ngram_size", 0, "0 (off) or more")):
        if globals()[key] < low:
            raise SystemExit(f"--{key}={globals()[key]}: must be {accepted}")


def main(argv):
    configurator.help_if_asked(globals(), argv)  # before the command is required
    if not argv or argv[0] not in ("index", "ask", "eval"):
        raise SystemExit("usage: python rag.py index|ask|eval --key=value ... (see the top of rag.py)")
    configurator.apply(globals(), argv[1:])
    check_numbers()
    torch.manual_seed(seed)
    if argv[0] == "index":
        if not tokenizer:
            raise SystemExit("--tokenizer=PATH is required: the model (folder or .gguf) whose tokens size the chunks")
        settings = {k: globals()[k] for k in SETTINGS}
        t0 = time.time()
        report = build_index(index, docs, load_tokenizer(tokenizer), settings, tokenizer)
        dropped = ": " + ", ".join(report["dropped"]) if report["dropped"] else ""
        print(f"{index}: {report['chunks']} chunks; {len(report['chunked'])} file(s) chunked, {len(report['kept'])} "
              f"unchanged, {len(report['dropped'])} dropped{dropped} ({time.time() - t0:.1f}s)")
        return
    if argv[0] == "ask":
        if not ckpt or not question:
            raise SystemExit("--ckpt=PATH (the model that answers) and --question=TEXT are required")
        inference.check_sampling(max_new_tokens, temperature, 50, 1.0, 1.0)
        model, tok, idx = _load(index)
        chunks = retrieve(idx, model, tok, question, top_k, rerank)
        budget = model.config.max_seq_len - min(max_new_tokens, model.config.max_seq_len // 2)
        messages, used = rag_messages(tok, question, chunks, budget, system)
        reply = inference.stream_reply(model, tok, inference.render_chat(tok, messages, system), max_new_tokens,
                                       temperature, on_text=lambda s: print(s, end="", flush=True),
                                       no_repeat_ngram_size=no_repeat_ngram_size)
        if not reply.strip():  # said, not left as a blank line: a model that has not learnt to answer yet does this
            said = "ended it at once" if not reply else "wrote only whitespace"
            print(f"(an empty answer: the model {said})", end="")
        print("\n\nSources:" if used else "\n\n(no passage shares a word with the question)" if not chunks
              else "\n\n(no room for a passage in the model's context)")
        for n, c in enumerate(used, 1):
            print(f"[{n}] {where(c)}")
        return
    model, tok, idx = _load(index) if ckpt else (None, None, Index.open(index))  # no model: BM25 alone
    qs = load_questions(questions)
    if max_questions and len(qs) > max_questions:
        qs = [qs[i * len(qs) // max_questions] for i in range(max_questions)]
    result = evaluate(idx, qs, model, tok, top_k, rerank, system)
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump({"index": index, "ckpt": ckpt, "top_k": top_k, "rerank": rerank, **result}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
