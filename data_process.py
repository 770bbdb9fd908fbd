"""Raw corpora -> clean text -> token streams on disk, for pretraining (`--format=pretrain`), SFT and DPO.

    python data_process.py --tokenizer=out/tok --out_dir=data/pydocs                  # embedded default corpus
    python data_process.py --input=corpus/,more.jsonl.gz --tokenizer=out/tok --out_dir=data/mine
    python data_process.py --format=sft --input=sft.jsonl --tokenizer=out/tok --out_dir=data/sft
    python data_process.py --format=sft --template=qa --input=sft.jsonl --tokenizer=out/tok --out_dir=data/sft_qa
    python data_process.py --bench=True --tokenizer=out/tok                            # MB/s and peak RSS

Inputs (`input`: comma-separated files, folders and globs; .txt/.jsonl/.json/.csv/.parquet, .gz read transparently,
everything streams) are read by readers.py, whose docstring says what `txt_split`, `text_field` and `exclude` do;
binary files (a PDF, an image) are skipped, named in one line.
  No --input: default_data.default_documents(), the language-reference topics of pydoc_data plus the docstrings of ~70 stdlib
  modules (~0.85 MB, deterministic for a Python version); with --format=sft/dpo, ~1,250 question -> first-sentence
  records derived from them (default_sft_records / default_dpo_records), the same ~10% of items held out in both.
Bad input (bytes that are not `encoding`, malformed JSON, a missing field, a broken .gz, an invalid chat record)
stops with `path:line: what`; with `lenient=True` such records are skipped, counted and listed in meta.json instead.

Cleaning (pretrain text; SFT/DPO text only loses ANSI codes and control characters): clean.py's rules 1-5
(control characters, NFKC, repeated marks, CJK punctuation, optional final period), then
  6. Documents shorter than `min_chars` are dropped; exact duplicates (blake2b of the cleaned text) and near
     duplicates (one-permutation MinHash over character `shingle`-grams, LSH bands, confirmed when the estimated
     Jaccard similarity >= `near_dup_threshold`; ~2.5 KB of RAM per kept document, so a million documents need
     ~2.5 GB: turn near_dedup off or dedup shards beyond that) go. Counts of all of it -> meta.json.

On-disk layouts (np.memmap friendly; dtype uint16, or uint32 when vocab_size > 65535; meta.json says which):
  pretrain: train.bin / val.bin one token stream each, EOS after every document (BOS before it when `bos`).
            Documents go to val greedily so val holds `val_fraction` of the tokens, deterministically.
  sft:      {split}.bin tokens, {split}_mask.bin uint8 (1 = an assistant token that is trained on: each reply and its
            end-of-turn marker as the chat template renders them, ChatML "reply<|im_end|>\n", qa "reply" + EOS; the
            mask comes from these spans, so an EOS that is also the pad token is trained), {split}_idx.npy int64
            record offsets (n + 1). data.load_sft(dir, split)[i] -> (input_ids, labels), labels -100 where the mask is 0
            (not shifted). Records longer than `max_len` are cut: counts.truncated, and those that lost all
            supervised tokens are dropped, counts.dropped_lost_all_supervised_tokens.
  dpo:      {split}.bin tokens (prompt, chosen, rejected of each record back to back), {split}_idx.npy int64 (n, 4)
            = prompt start, chosen start, rejected start, end. data.load_dpo(dir, split)[i] -> (prompt, chosen,
            rejected); the prompt ends with the generation prompt, the replies with the end-of-turn marker. Over `max_len`
            (counted): the prompt keeps its last max_len/2 tokens at most, then the replies are cut.
  Every data dir also holds meta.json (dtype, vocab_size, token counts, tokenizer_sha256, bos/eos ids, sources,
  counts; pretrain: "bytes" {train, val}, the UTF-8 bytes of the cleaned text behind each split's tokens, for
  bits per byte = loss * tokens / (bytes * ln 2), which compares across tokenizers) and the tokenizer
  (save_pretrained), so trainers can check they use the same one.
Chat templates (`template`, sft and dpo): auto renders with the tokenizer's own chat template (ChatML for ours and
for one without a template, SmolLM2's for it); chatml with "<|im_start|>{role}\n{content}<|im_end|>\n" and the
generation prompt "<|im_start|>assistant\n"; qa with "##Question:\n{q}\n" then "##Answer:\n{a}" + EOS for each turn
(the format of the Chinese Phi-2 projects; a system prompt is a first line of its own, "{system}\n"). The data dir's
tokenizer carries the template used. ChatML markers the vocabulary lacks (a plain GPT-2 or LLaMA tokenizer) are
added as special tokens at new ids after it; meta.json then holds base_tokenizer_sha256 (the tokenizer before) and
added_tokens ({token: id}), and the model's embeddings must grow to the new vocab_size.
Chat records (any mix; a .csv's columns name them, readers.CSV_LAYOUTS: instruction,output[,input,system],
prompt,completion or [prompt,]chosen,rejected): alpaca {instruction, input, output[, system, history]}, sharegpt
{conversations:[{from, value}], system}, messages {messages:[{role, content}]}, TRL's {prompt, completion} (strings
or message lists, optional system), other keys renamed to these with `rename` (riddles:
--rename=riddle:prompt,answer:completion); preference {prompt, chosen, rejected}, {conversations, chosen, rejected}
with chosen/rejected as strings or {from, value}, and hh-rlhf full "Human:/Assistant:" transcripts. Roles must
alternate (user first, optional system), contents be non-empty, SFT end with the assistant (trailing unanswered user
turns are dropped, counted). A record with "split": "train"/"val" keeps that split.
"""
import collections
import hashlib
import itertools
import json
import os
import re
import sys
import time

import numpy as np
from tqdm import tqdm

import configurator
import data
import workers
from chat_data import prepare_chat
from clean import clean_text
from dedup import NearDedup, minhash
from default_data import default_documents, default_dpo_records, default_sft_records
from readers import (EXCLUDE as _EXCLUDE, Issues, check_csv_layouts, check_options, expand_inputs, iter_documents,
                     iter_records, skipped_summary)

# -------------------------------------------------------------------------------------------------------- config
input = ""                 # files, folders, globs (comma-separated); empty: the embedded Python-docs corpus
tokenizer = ""             # a tokenizer folder (train_tokenizer.py's out_dir) or .gguf, for Tokenizer.from_pretrained
out_dir = "data/pydocs"
format = "pretrain"        # pretrain | sft | dpo
val_fraction = 0.1
text_field = "text"        # field / column holding the text; "a,b" tries a then b; "#N": column N of a headerless csv
txt_split = "line"         # line | blank | file | a separator line such as "%"
exclude = _EXCLUDE         # file-name globs skipped inside folders and globs
encoding = "utf-8"         # of the input files: utf-8, gb18030 (GBK/GB2312 Chinese), latin-1 ...
nfkc = True
cjk_punct = True           # the CJK punctuation rule (module docstring, step 4)
collapse_punct = True
final_period = False
min_chars = 10
dedup = True               # exact duplicates
near_dedup = True          # MinHash near duplicates
near_dup_threshold = 0.8
minhash_perms = 128
shingle = 5                # characters per shingle (works for CJK and space-separated text alike)
bos = False                # BOS before every pretraining document
dtype = "auto"             # auto | uint16 | uint32
max_len = 1024             # sft/dpo: records longer than this are truncated (counted); at least 32
template = "auto"          # sft/dpo: auto (the tokenizer's chat template) | chatml | qa (module docstring)
rename = ""                # sft/dpo: record keys renamed before reading: "old:new,..." (module docstring)
num_workers = 0            # tokenizer processes; 0: one per CPU core
lenient = False            # skip and count bad records instead of stopping
bench = False              # measure MB/s and peak RSS with 1 and 2 workers instead of a normal run
_DEFAULTS = {k: v for k, v in globals().items() if k in configurator.config_keys(globals())}


def config(**overrides):
    """The defaults above with `overrides` (checked like command-line flags): for tests and other scripts."""
    scope = dict(_DEFAULTS)
    return configurator.apply(scope, [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                                      for k, v in overrides.items()])


# ------------------------------------------------------------------------------------------------- pretraining
LONG_DOC, PIECE = 1 << 20, 1 << 12  # characters: a longer document is tokenized in pieces of about PIECE (_encode)
_CUT = re.compile(r"(?<=\S) ")  # a space after a non-space: no token of our tokenizers spans it


def _pieces(text):
    """`text` in pieces of about PIECE characters, each cut just before a space that follows a non-space. No token
    spans such a place (a sentencepiece BPE has whitespace only at the start of its pieces, and byte-level
    pre-tokenizers split there as well), so the pieces' ids are the whole text's, except for a tokenizer that adds a
    dummy prefix to every text it encodes (LLaMA's). Text without a space for LONG_DOC characters is cut anyway."""
    start = 0
    while len(text) - start > PIECE:
        m = _CUT.search(text, start + PIECE, start + LONG_DOC)
        if m is None and len(text) - start <= LONG_DOC:
            break
        cut = m.start() if m else start + LONG_DOC
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_long(tok, text, bos):
    """A document over LONG_DOC characters, a megabyte of pieces at a time: sentencepiece needs ~40x the size of the
    string it encodes at once, and a list of Python ints holds ~36 bytes per token."""
    ends = tok.encode("", bos=bos, eos=True)  # [BOS,] EOS, checked as encode_batch checks them
    parts = [np.array(ends[:-1], dtype=np.int64)]
    for group in workers.batches(_pieces(text), max_items=1 << 30):
        parts.append(np.fromiter(itertools.chain.from_iterable(tok.encode_batch(group)), dtype=np.int64))
    return np.concatenate(parts + [np.array(ends[-1:], dtype=np.int64)])


def _encode(tok, texts, bos):
    """The ids of the texts, each with EOS (and BOS), as one flat int64 array, and the lengths."""
    arrays, lens = [], []
    for long, run in itertools.groupby(texts, key=lambda t: len(t) > LONG_DOC):
        if long:
            for text in run:
                arrays.append(_encode_long(tok, text, bos))
                lens.append(len(arrays[-1]))
        else:
            ids = tok.encode_batch(list(run), bos=bos, eos=True)
            sizes = [len(x) for x in ids]
            arrays.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(sizes)))
            lens += sizes
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int64)), np.array(lens, dtype=np.int64)


def _clean_and_encode(docs):
    """Worker: clean, hash, sign and tokenize a batch of documents."""
    tok, cfg = workers.state["tok"], workers.state["cfg"]
    counts = collections.Counter(docs_read=len(docs), bytes_in=sum(len(d.encode("utf-8")) for d in docs))
    kept = []
    for i in range(len(docs)):
        text = clean_text(docs[i], cfg, counts)
        docs[i] = None  # the batch is ours: a very long document then lives on only as its cleaned copy
        if len(text) < cfg["min_chars"]:
            counts["removed_too_short"] += 1
        else:
            kept.append(text)
    flat, lens = _encode(tok, kept, cfg["bos"])
    if not flat.size or 0 <= flat.min() <= flat.max() < tok.vocab_size:  # else left for data.check_ids to report
        flat = flat.astype(data.choose_dtype(tok.vocab_size, cfg["dtype"]))  # 2 bytes a token to send, not 8
    encoded = [t.encode("utf-8") for t in kept]
    hashes = [hashlib.blake2b(b, digest_size=8).digest() for b in encoded]
    sigs = minhash(kept, cfg["shingle"], cfg["minhash_perms"]) if cfg["near_dedup"] and kept else None
    return counts, flat, lens, hashes, sigs, [len(b) for b in encoded]


def _usage():
    """(peak RSS MB of this process, of its largest finished child, CPU seconds of both), None off Unix."""
    try:
        import resource
    except ImportError:  # Windows
        return None, None, None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return (round(me.ru_maxrss * scale, 1), round(kids.ru_maxrss * scale, 1),
            round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 2))


def prepare_pretrain(cfg, tok, tok_source, docs, sources, issues):
    """Clean, dedup, tokenize (in worker processes) and write train.bin/val.bin/meta.json; returns the meta dict."""
    out, t0 = cfg["out_dir"], time.time()
    os.makedirs(out, exist_ok=True)
    dt, counts, seen = data.choose_dtype(tok.vocab_size, cfg["dtype"]), collections.Counter(), set()
    near = NearDedup(cfg["near_dup_threshold"], cfg["minhash_perms"]) if cfg["near_dedup"] else None
    tokens, ndocs, n_bytes, bar = {"train": 0, "val": 0}, {"train": 0, "val": 0}, {"train": 0, "val": 0}, None
    with data.SplitWriter(out, ["train.bin", "val.bin"]) as writer:
        for c, flat, lens, hashes, sigs, doc_bytes in workers.parallel_map(_clean_and_encode, workers.batches(docs),
                                                                       workers.count(cfg["num_workers"]),
                                                                       (tok_source, cfg)):
            bar = tqdm(desc="documents", unit="doc") if bar is None else bar  # after the fork: no tqdm thread there
            counts.update(c)
            data.check_ids(flat, tok.vocab_size)
            keys = near.band_keys(sigs) if near is not None and len(lens) else None
            dest = np.zeros(len(lens), dtype=np.int8)  # per document: 0 dropped, 1 train, 2 val
            for i, n in enumerate(lens.tolist()):
                if cfg["dedup"] and hashes[i] in seen:
                    counts["removed_exact_dup"] += 1
                    continue
                seen.add(hashes[i])
                if near is not None and near.is_duplicate(sigs[i], keys[i]):
                    counts["removed_near_dup"] += 1
                    continue
                # greedy split: a document goes to val while val holds less than val_fraction of the tokens
                split = "val" if tokens["val"] < cfg["val_fraction"] * (tokens["train"] + tokens["val"]) else "train"
                dest[i] = 1 + (split == "val")
                tokens[split], ndocs[split] = tokens[split] + n, ndocs[split] + 1
                n_bytes[split] += doc_bytes[i]
            per_token = np.repeat(dest, lens)
            for code, split in ((1, "train"), (2, "val")):
                part = flat[per_token == code]
                if len(part):
                    writer.write(f"{split}.bin", part, dt)
            bar.update(c["docs_read"])
            bar.set_postfix(tokens=tokens["train"] + tokens["val"], refresh=False)
        if bar is not None:
            bar.close()
        if counts["docs_read"] == 0:
            raise SystemExit(f"{cfg['input'] or 'input'}: empty input, no documents were read")
        if ndocs["train"] == 0 or (cfg["val_fraction"] > 0 and ndocs["val"] == 0):
            raise SystemExit(f"only {ndocs['train'] + ndocs['val']} document(s) left after cleaning and dedup: too "
                             f"few for a train/val split (cut the text into more documents, e.g. --txt_split=blank)")
    seconds = time.time() - t0
    rss_main, rss_workers, cpu = _usage()
    counts.update(skipped_bad_records=issues.count, kept=ndocs["train"] + ndocs["val"])
    run_stats = {"seconds": round(seconds, 2), "mb_per_s": round(counts["bytes_in"] / 1e6 / max(seconds, 1e-9), 3),
                 "cpu_seconds": cpu, "workers": workers.count(cfg["num_workers"]), "peak_rss_main_mb": rss_main,
                 "peak_rss_worker_mb": rss_workers}
    return data.write_meta(out, tok, dt, cfg, {
        "train_tokens": tokens["train"], "val_tokens": tokens["val"], "bytes": n_bytes, "train_docs": ndocs["train"],
        "val_docs": ndocs["val"], "sources": list(sources), "source_documents": dict(sources),
        "counts": dict(sorted(counts.items())), "skipped_examples": issues.examples, "run": run_stats})


def _report(meta):
    c = meta["counts"]
    print(f"wrote {meta['config']['out_dir']}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}), {c.get('kept', 0):,} kept of {c.get('docs_read', c.get('records_read', 0)):,}")
    print("  " + ", ".join(f"{k}={v:,}" for k, v in c.items() if k not in ("kept",)))
    if meta["format"] != "pretrain":
        print(f"  max_len={meta['max_len']:,}: {c.get('truncated', 0):,} record(s) truncated" + (
            f", {c.get('dropped_lost_all_supervised_tokens', 0):,} of them lost all supervised tokens and were "
            f"dropped" if meta["format"] == "sft" else " (the prompt keeps its end, then the replies are cut)"))
    if meta.get("added_tokens"):
        print(f"  added special tokens {meta['added_tokens']} to the tokenizer (vocab_size now "
              f"{meta['vocab_size']:,}): the model's embeddings must grow to match")
    for e in meta.get("skipped_examples", [])[:5]:
        print(f"  skipped: {e}")
    if "run" in meta:
        r = meta["run"]
        print(f"  {r['seconds']}s, {r['mb_per_s']} MB/s with {r['workers']} worker(s), peak RSS "
              f"{r['peak_rss_main_mb']} MB main / {r['peak_rss_worker_mb']} MB per worker")


# --------------------------------------------------------------------------------------------------------- main
MIN_CHAT_LEN = 32  # tokens: the chat template's markers take ~10-25 of each exchange, and DPO prompts get half


def check_numbers(cfg):
    """Stop on a numeric setting out of its range, naming the key and the range, before any reading."""
    if cfg["format"] != "pretrain" and cfg["max_len"] < MIN_CHAT_LEN:
        raise SystemExit(f"max_len={cfg['max_len']}: must be at least {MIN_CHAT_LEN} tokens for --format="
                         f"{cfg['format']} (the chat template alone takes ~10-25 per exchange)")
    for key, ok, accepted in (("val_fraction", 0 <= cfg["val_fraction"] < 1, "in [0, 1)"),
                              ("near_dup_threshold", 0 < cfg["near_dup_threshold"] <= 1, "in (0, 1]"),
                              ("min_chars", cfg["min_chars"] >= 0, "0 or more"),
                              ("num_workers", cfg["num_workers"] >= 0, "0 (one per CPU core) or more")):
        if not ok:
            raise SystemExit(f"{key}={cfg[key]}: must be {accepted}")


def run(cfg, tok=None):
    """Do what the config says; `tok` (an object with the Tokenizer interface) overrides cfg["tokenizer"]."""
    if cfg["format"] not in ("pretrain", "sft", "dpo"):
        raise SystemExit(f"format must be pretrain, sft or dpo, not {cfg['format']!r}")
    check_options(cfg["txt_split"], cfg["encoding"])
    if os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        raise SystemExit(f"out_dir {cfg['out_dir']} is a file, not a folder")
    if cfg["minhash_perms"] < 1 or cfg["minhash_perms"] & (cfg["minhash_perms"] - 1) or cfg["shingle"] < 1:
        raise SystemExit("minhash_perms must be a power of two and shingle at least 1")
    check_numbers(cfg)
    tok_source = tok
    if tok is None:
        if not cfg["tokenizer"]:
            raise SystemExit("--tokenizer=DIR is required (train one with train_tokenizer.py)")
        from tokenizer import Tokenizer
        try:
            tok = Tokenizer.from_pretrained(cfg["tokenizer"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"--tokenizer={cfg['tokenizer']}: {e}")
        import multiprocessing as mp  # forked workers inherit the loaded tokenizer; others load it again
        tok_source = tok if mp.get_start_method() == "fork" else cfg["tokenizer"]
    issues, sources = Issues(cfg["lenient"]), {}
    if cfg["input"]:
        files, skipped = expand_inputs(cfg["input"], cfg["exclude"])
        print(f"reading {len(files)} file(s)" + (f"; {skipped_summary(skipped)}" if skipped else ""))
        check_csv_layouts(files, cfg)
        records = iter_records(files, cfg, issues, sources)
        docs = iter_documents(files, cfg, issues, sources)
    else:
        name = f"python {sys.version.split()[0]} stdlib docs (pydoc_data topics, docstrings)"
        sources[name] = 0
        default = {"pretrain": default_documents, "sft": default_sft_records, "dpo": default_dpo_records}
        records = [(r, "<default>", i + 1) for i, r in enumerate(default[cfg["format"]]())]
        docs = [r for r, _, _ in records]
        sources[name] = len(records)
    if cfg["format"] == "pretrain":
        meta = prepare_pretrain(cfg, tok, tok_source, docs, sources, issues)
    else:
        meta = prepare_chat(cfg, tok, tok_source, records, sources, issues)
    _report(meta)
    return meta


def run_bench(cfg):
    """Pipeline throughput (read, clean, dedup, tokenize, write) and peak RSS with 1 and 2 workers, each run in a
    fresh process so peaks do not carry over."""
    import subprocess
    import tempfile
    if not cfg["tokenizer"]:
        raise SystemExit("--bench=True needs --tokenizer=DIR (e.g. a BPE trained with train_tokenizer.py)")
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
    corpora = [(cfg["input"], [])] if cfg["input"] else [
        (os.path.join(shared, "pretrain_zh", "chinese_poetry"), ["--text_field=paragraphs,content,para",
                                                                 "--lenient=True"]),
        (os.path.join(shared, "pretrain_en", "gutenberg"), ["--txt_split=blank", "--lenient=True"])]
    print(f"{'corpus':<16} {'workers':>7} {'MB in':>7} {'seconds':>8} {'MB/s':>6} {'CPU s':>6} {'tokens':>10} "
          f"{'RSS main MB':>11} {'RSS worker MB':>13}")
    for path, extra in corpora:
        for n_workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), f"--input={path}", f"--tokenizer={cfg['tokenizer']}",
                       f"--out_dir={tmp}", f"--num_workers={n_workers}", *extra]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                with open(os.path.join(tmp, "meta.json"), encoding="utf-8") as f:
                    meta = json.load(f)
            r = meta["run"]
            print(f"{os.path.basename(path.rstrip('/')):<16} {n_workers:>7} {meta['counts']['bytes_in'] / 1e6:>7.2f} "
                  f"{r['seconds']:>8.2f} {r['mb_per_s']:>6.2f} {r['cpu_seconds']:>6} "
                  f"{meta['train_tokens'] + meta['val_tokens']:>10,} "
                  f"{r['peak_rss_main_mb']:>11} {r['peak_rss_worker_mb'] if n_workers > 1 else '-':>13}")


if __name__ == "__main__":
    _cfg = configurator.apply(globals(), sys.argv[1:])
    run_bench(_cfg) if _cfg["bench"] else run(_cfg)
