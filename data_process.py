"""Raw corpora -> clean text -> token streams on disk, for pretraining (`--format=pretrain`), SFT and DPO.

    python data_process.py --tokenizer=out/tok --out_dir=data/pydocs                  # embedded default corpus
    python data_process.py --input=corpus/,more.jsonl.gz --tokenizer=out/tok --out_dir=data/mine
    python data_process.py --format=sft --input=sft.jsonl --tokenizer=out/tok --out_dir=data/sft
    python data_process.py --bench=True --tokenizer=out/tok                            # MB/s and peak RSS

Inputs (`input`: comma-separated files, folders and globs; .txt/.jsonl/.json/.csv/.parquet, .gz read transparently,
everything streams) are read by readers.py, whose docstring says what `txt_split`, `text_field` and `exclude` do.
  No --input: default_data.default_documents(), the language-reference topics of pydoc_data plus the docstrings of ~70 stdlib
  modules (~0.85 MB, deterministic for a Python version); with --format=sft/dpo, ~1,250 question -> first-sentence
  records derived from them (default_sft_records / default_dpo_records), the same ~10% of items held out in both.
Bad input (bytes that are not `encoding`, malformed JSON, a missing field, a broken .gz, an invalid chat record)
stops with `path:line: what`; with `lenient=True` such records are skipped, counted and listed in meta.json instead.

Cleaning (pretrain text; SFT/DPO text only loses ANSI codes and control characters), in this order:
  1. ANSI escape sequences and control characters (all of Unicode Cc except \\t and \\n; \\r\\n -> \\n; zero-width
     space, BOM, word joiner, soft hyphen) are removed.
  2. NFKC: full-width letters/digits/space become ASCII and compatibility ideographs are unified - and full-width
     punctuation such as '，！？：；（）' becomes ASCII too (also lossy bits: '²' -> '2', '①' -> '1'); '…' is kept.
  3. Runs of one repeated mark among 。，、！？；：,!?; collapse to one ("。。。。。" -> "。"); '...', '……', '——' stay.
  4. CJK punctuation rule (documents with CJK only), undoing step 2 in Chinese/Japanese: , ! ? : ; become ，！？：；when the
     character right before or after is CJK (Han, kana, CJK punctuation), and spaces after them before CJK go;
     '.' becomes '。' only between a Han character and whitespace/Han/end (so 3.14, v1.2, 文件.txt stay);
     a parenthesised span containing CJK becomes （...）. Elsewhere punctuation stays half-width.
  5. Optional final period (`final_period`): a document ending in a letter/digit gets '。' after Han, else '.'.
  6. Documents shorter than `min_chars` are dropped; exact duplicates (blake2b of the cleaned text) and near
     duplicates (one-permutation MinHash over character `shingle`-grams, LSH bands, confirmed when the estimated
     Jaccard similarity >= `near_dup_threshold`; ~2.5 KB of RAM per kept document, so a million documents need
     ~2.5 GB: turn near_dedup off or dedup shards beyond that) go. Counts of all of it -> meta.json.

On-disk layouts (np.memmap friendly; dtype uint16, or uint32 when vocab_size > 65535; meta.json says which):
  pretrain: train.bin / val.bin one token stream each, EOS after every document (BOS before it when `bos`).
            Documents go to val greedily so val holds `val_fraction` of the tokens, deterministically.
  sft:      {split}.bin tokens, {split}_mask.bin uint8 (1 = an assistant token that is trained on: each reply and its
            end-of-turn marker as the chat template renders them, ChatML "reply<|im_end|>\n"), {split}_idx.npy int64
            record offsets (n + 1). load_sft(dir, split)[i] -> (input_ids, labels), labels -100 where the mask is 0
            (not shifted). Records longer than `max_len` are cut (counted; dropped when no reply token is left).
  dpo:      {split}.bin tokens (prompt, chosen, rejected of each record back to back), {split}_idx.npy int64 (n, 4)
            = prompt start, chosen start, rejected start, end. load_dpo(dir, split)[i] -> (prompt, chosen, rejected);
            the prompt ends with the generation prompt, the replies with the end-of-turn marker. Over `max_len`
            (counted): the prompt keeps its last max_len/2 tokens at most, then the replies are cut.
  Every data dir also holds meta.json (dtype, vocab_size, token counts, tokenizer_sha256, bos/eos ids, sources,
  counts) and the tokenizer (save_pretrained), so trainers can check they use the same one.
Chat records (any mix): alpaca {instruction, input, output[, system, history]}, sharegpt {conversations:[{from,
value}], system}, messages {messages:[{role, content}]}; preference {prompt, chosen, rejected}, {conversations,
chosen, rejected} with chosen/rejected as strings or {from, value}, and hh-rlhf full "Human:/Assistant:"
transcripts. Roles must alternate (user first, optional system), contents be non-empty, SFT end with the assistant
(trailing unanswered user turns are dropped, counted). A record with "split": "train"/"val" keeps that split.
"""
import collections
import hashlib
import itertools
import json
import os
import re
import sys
import time
import unicodedata

import numpy as np
from tqdm import tqdm

import configurator
from dedup import NearDedup, minhash
from default_data import default_documents, default_dpo_records, default_sft_records
from readers import EXCLUDE as _EXCLUDE, Issues, check_options, expand_inputs, iter_documents, iter_records

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
max_len = 1024             # sft/dpo: records longer than this are truncated (counted)
num_workers = 0            # tokenizer processes; 0: one per CPU core
lenient = False            # skip and count bad records instead of stopping
bench = False              # measure MB/s and peak RSS with 1 and 2 workers instead of a normal run
_DEFAULTS = {k: v for k, v in globals().items() if k in configurator.config_keys(globals())}


def config(**overrides):
    """The defaults above with `overrides` (checked like command-line flags): for tests and other scripts."""
    scope = dict(_DEFAULTS)
    return configurator.apply(scope, [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                                      for k, v in overrides.items()])


# ------------------------------------------------------------------------------------------------------ cleaning
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad]")
_REPEATED = re.compile(r"([。，、！？；：,!?;])\1+")
_FULLWIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；"}
_TO_FULLWIDTH = re.compile(f"(?<=[{_CJK}])[,!?:;]|[,!?:;](?=[{_CJK}])")
_SPACE_AFTER_FULLWIDTH = re.compile(f"([，！？：；])[ \t]+(?=[{_CJK}])")
_PERIOD = re.compile(f"(?<=[{_HAN}])\\.(?=[\\s{_HAN}]|\\Z)")
_PARENS = re.compile(f"\\(([^()\\n]*[{_CJK}][^()\\n]*)\\)")
_IS_HAN, _HAS_CJK = re.compile(f"[{_HAN}]"), re.compile(f"[{_CJK}]")


def strip_control(text, counts=None):
    """Step 1 of the cleaning: ANSI escape codes, control characters (keeping \\t and \\n), \\r\\n -> \\n."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, n_ansi = _ANSI.subn("", text)
    text, n_ctrl = _CONTROL.subn("", text)
    if counts is not None:
        counts["ansi_codes_removed"] += n_ansi
        counts["control_chars_removed"] += n_ctrl
    return text


def clean_text(text, cfg, counts):
    """The pretraining cleaning rules (module docstring); `counts` collects what the steps changed."""
    raw, text = text, strip_control(text, counts)
    if cfg["nfkc"]:
        text = "…".join(unicodedata.normalize("NFKC", t) for t in text.split("…"))  # NFKC makes … into ...
    if cfg["collapse_punct"]:
        text, n = _REPEATED.subn(r"\1", text)
        counts["punct_runs_collapsed"] += n
    if cfg["cjk_punct"] and _HAS_CJK.search(text):
        text, n1 = _TO_FULLWIDTH.subn(lambda m: _FULLWIDTH[m.group()], text)
        text, n2 = _PERIOD.subn("。", text)
        text, n3 = _PARENS.subn(r"（\1）", text)
        text = _SPACE_AFTER_FULLWIDTH.sub(r"\1", text)
        counts["punct_made_fullwidth"] += n1 + n2 + 2 * n3  # mostly marks that NFKC had made ASCII
    text = text.strip()
    if cfg["final_period"] and text and text[-1].isalnum():
        text += "。" if _IS_HAN.match(text[-1]) else "."
        counts["final_period_added"] += 1
    counts["docs_changed_by_cleaning"] += text != raw.strip()
    return text


# ------------------------------------------------------------------------------------------------ worker pool
_W = {}


def _init_worker(tok_source, cfg):
    if isinstance(tok_source, str):
        from tokenizer import Tokenizer
        tok_source = Tokenizer.from_pretrained(tok_source)
    _W.update(tok=tok_source, cfg=cfg)


def _parallel_map(fn, items, num_workers, initargs):
    """map(fn, items) in order over worker processes, with at most 2 batches per worker in flight, so memory stays
    flat however long `items` is (Pool.imap would read the whole input ahead)."""
    if num_workers <= 1:
        _init_worker(*initargs)
        yield from map(fn, items)
        return
    import multiprocessing as mp
    with mp.get_context().Pool(num_workers, _init_worker, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batches(items, max_chars=1 << 20, max_items=512):
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item) if isinstance(item, str) else 1
        if size >= max_chars or len(batch) >= max_items:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _clean_and_encode(docs):
    """Worker: clean, hash, sign and tokenize a batch of documents."""
    tok, cfg = _W["tok"], _W["cfg"]
    counts = collections.Counter(docs_read=len(docs), bytes_in=sum(len(d.encode("utf-8")) for d in docs))
    kept = []
    for doc in docs:
        text = clean_text(doc, cfg, counts)
        if len(text) < cfg["min_chars"]:
            counts["removed_too_short"] += 1
        else:
            kept.append(text)
    ids = tok.encode_batch(kept, bos=cfg["bos"], eos=True)
    hashes = [hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in kept]
    sigs = minhash(kept, cfg["shingle"], cfg["minhash_perms"]) if cfg["near_dedup"] and kept else None
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    return counts, flat, lens, hashes, sigs


def choose_dtype(vocab_size, forced="auto"):
    need = np.uint16 if vocab_size <= 65535 else np.uint32
    if forced == "auto":
        return need
    if forced not in ("uint16", "uint32"):
        raise SystemExit(f"dtype must be auto, uint16 or uint32, not {forced!r}")
    if np.dtype(forced).itemsize < np.dtype(need).itemsize and vocab_size > 65536:
        raise SystemExit(f"vocab_size {vocab_size} is too large for dtype {forced} (ids up to {vocab_size - 1} "
                         f"do not fit in 16 bits): use --dtype=uint32 or auto")
    return np.dtype(forced).type


def _check_ids(ids, vocab_size):
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        raise SystemExit(f"the tokenizer produced id {int(ids.max())} outside its vocab_size {vocab_size}")


class _SplitWriter:
    """Appends arrays to {name}.tmp files, renamed when the `with` block ends well and removed when it fails, so an
    error never leaves a half-written dataset behind."""

    def __init__(self, out, names):
        self.paths = {n: os.path.join(out, n) for n in names}
        self.files = {n: open(p + ".tmp", "wb") for n, p in self.paths.items()}

    def write(self, name, arr, dtype):
        arr.astype(dtype, copy=False).tofile(self.files[name])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        for n, f in self.files.items():
            f.close()
            (os.remove(self.paths[n] + ".tmp") if exc_type else os.replace(self.paths[n] + ".tmp", self.paths[n]))


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


def _workers(cfg):
    return cfg["num_workers"] or os.cpu_count() or 1


def _write_meta(out, tok, dtype, cfg, extra):
    meta = {"format": cfg["format"], "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, **extra,
            "tokenizer_sha256": tok.checksum(), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "config": {k: v for k, v in cfg.items() if k not in ("bench",)}}
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    tok.save_pretrained(out)
    return meta


def prepare_pretrain(cfg, tok, tok_source, docs, sources, issues):
    """Clean, dedup, tokenize (in worker processes) and write train.bin/val.bin/meta.json; returns the meta dict."""
    out, t0 = cfg["out_dir"], time.time()
    os.makedirs(out, exist_ok=True)
    dt, counts, seen = choose_dtype(tok.vocab_size, cfg["dtype"]), collections.Counter(), set()
    near = NearDedup(cfg["near_dup_threshold"], cfg["minhash_perms"]) if cfg["near_dedup"] else None
    tokens, ndocs, bar = {"train": 0, "val": 0}, {"train": 0, "val": 0}, None
    with _SplitWriter(out, ["train.bin", "val.bin"]) as writer:
        for c, flat, lens, hashes, sigs in _parallel_map(_clean_and_encode, _batches(docs), _workers(cfg),
                                                         (tok_source, cfg)):
            bar = tqdm(desc="documents", unit="doc") if bar is None else bar  # after the fork: no tqdm thread there
            counts.update(c)
            _check_ids(flat, tok.vocab_size)
            keys = near.band_keys(sigs) if near is not None and len(lens) else None
            parts, starts = {"train": [], "val": []}, np.concatenate([[0], np.cumsum(lens)])
            for i, n in enumerate(lens):
                if cfg["dedup"] and hashes[i] in seen:
                    counts["removed_exact_dup"] += 1
                    continue
                seen.add(hashes[i])
                if near is not None and near.is_duplicate(sigs[i], keys[i]):
                    counts["removed_near_dup"] += 1
                    continue
                # greedy split: a document goes to val while val holds less than val_fraction of the tokens
                split = "val" if tokens["val"] < cfg["val_fraction"] * (tokens["train"] + tokens["val"]) else "train"
                parts[split].append(flat[starts[i]:starts[i + 1]])
                tokens[split], ndocs[split] = tokens[split] + int(n), ndocs[split] + 1
            for split, p in parts.items():
                if p:
                    writer.write(f"{split}.bin", np.concatenate(p), dt)
            bar.update(c["docs_read"])
            bar.set_postfix(tokens=tokens["train"] + tokens["val"])
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
                 "cpu_seconds": cpu, "workers": _workers(cfg), "peak_rss_main_mb": rss_main,
                 "peak_rss_worker_mb": rss_workers}
    meta = _write_meta(out, tok, dt, cfg, {
        "train_tokens": tokens["train"], "val_tokens": tokens["val"], "train_docs": ndocs["train"],
        "val_docs": ndocs["val"], "sources": list(sources), "source_documents": dict(sources),
        "counts": dict(sorted(counts.items())), "skipped_examples": issues.examples, "run": run_stats})
    _report(meta)
    return meta


def _report(meta):
    c = meta["counts"]
    print(f"wrote {meta['config']['out_dir']}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}), {c.get('kept', 0):,} kept of {c.get('docs_read', c.get('records_read', 0)):,}")
    print("  " + ", ".join(f"{k}={v:,}" for k, v in c.items() if k not in ("kept",)))
    for e in meta.get("skipped_examples", [])[:5]:
        print(f"  skipped: {e}")
    if "run" in meta:
        r = meta["run"]
        print(f"  {r['seconds']}s, {r['mb_per_s']} MB/s with {r['workers']} worker(s), peak RSS "
              f"{r['peak_rss_main_mb']} MB main / {r['peak_rss_worker_mb']} MB per worker")


# --------------------------------------------------------------------------------------------------------- main
def run(cfg, tok=None):
    """Do what the config says; `tok` (an object with the Tokenizer interface) overrides cfg["tokenizer"]."""
    if cfg["format"] not in ("pretrain", "sft", "dpo"):
        raise SystemExit(f"format must be pretrain, sft or dpo, not {cfg['format']!r}")
    check_options(cfg["txt_split"], cfg["encoding"])
    if cfg["minhash_perms"] < 1 or cfg["minhash_perms"] & (cfg["minhash_perms"] - 1) or cfg["shingle"] < 1:
        raise SystemExit("minhash_perms must be a power of two and shingle at least 1")
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
        print(f"reading {len(files)} file(s)" + (f"; skipped {len(skipped)}: {', '.join(skipped[:8])}" if skipped
                                                  else ""))
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
        return prepare_pretrain(cfg, tok, tok_source, docs, sources, issues)
    from chat_data import prepare_chat  # imported here: chat_data builds on this module
    return prepare_chat(cfg, tok, tok_source, records, sources, issues)


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
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), f"--input={path}", f"--tokenizer={cfg['tokenizer']}",
                       f"--out_dir={tmp}", f"--num_workers={workers}", *extra]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                with open(os.path.join(tmp, "meta.json"), encoding="utf-8") as f:
                    meta = json.load(f)
            r = meta["run"]
            print(f"{os.path.basename(path.rstrip('/')):<16} {workers:>7} {meta['counts']['bytes_in'] / 1e6:>7.2f} "
                  f"{r['seconds']:>8.2f} {r['mb_per_s']:>6.2f} {r['cpu_seconds']:>6} "
                  f"{meta['train_tokens'] + meta['val_tokens']:>10,} "
                  f"{r['peak_rss_main_mb']:>11} {r['peak_rss_worker_mb'] if workers > 1 else '-':>13}")


if __name__ == "__main__":
    _cfg = configurator.apply(globals(), sys.argv[1:])
    run_bench(_cfg) if _cfg["bench"] else run(_cfg)
