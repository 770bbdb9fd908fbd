"""Train a LLaMA-style sentencepiece tokenizer (BPE with byte fallback, or char-level) on text files.

    python train_tokenizer.py --input=corpus.txt,more/,web/*.jsonl.gz --vocab_size=8192 --out_dir=out/tokenizer
    python train_tokenizer.py                      # no --input: the embedded default corpus (data_process.py)
    python train_tokenizer.py --bench=True         # 100M characters from ../shared/data: wall time and peak RSS

Inputs are read by readers.py, as data_process.py reads them (.txt, .jsonl, .json, .csv, .parquet, each optionally
.gz; folders and globs; --text_field, --txt_split, --encoding and --lenient mean the same there), without cleaning.

Exact round trip: identity normalisation, no dummy prefix and no whitespace collapsing, so tabs, newlines, runs of
spaces, CJK and emoji all come back byte for byte; characters the vocabulary lacks fall back to byte pieces
(<0x0A> is the newline, as in LLaMA). BOS/EOS/pad and ChatML's <|im_start|>/<|im_end|> are reserved as single ids.

Bounded memory: the corpus is streamed once, keeping a uniform random sample of its lines that holds at most
`max_chars` characters; only that sample reaches sentencepiece, so RAM and time do not grow with the corpus.
Writes out_dir/tokenizer.model, tokenizer.json and tokenizer_config.json (transformers-loadable, same ids), and
sentencepiece's own log (hundreds of lines: its options, then every 100th merge) to out_dir/sentencepiece.log.
"""
import gzip
import heapq
import io
import itertools
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time

import sentencepiece as spm
from tqdm import tqdm

import configurator
import readers
from default_data import default_documents  # the embedded corpus: text that ships with Python
from tokenizer import BOS, EOS, IM_END, IM_START, PAD, UNK, Tokenizer, _tokenizers_from_spm

input = ""  # comma-separated files, folders or globs; empty: the embedded default corpus
text_field = "text"  # field / column holding the text; "a,b" tries a then b; "#N": column N of a headerless csv
txt_split = "line"  # line | blank | file | a separator line such as "%"
encoding = "utf-8"  # of the input files: utf-8, gb18030 (GBK/GB2312 Chinese), latin-1 ...
lenient = False  # skip and count bad records (undecodable lines, malformed JSON, a missing field) instead of stopping
model_type = "bpe"  # bpe | char
vocab_size = 8192  # for char: an upper bound (the vocabulary is the characters seen, plus the 256 byte pieces)
out_dir = "out/tokenizer"
character_coverage = 0.9995  # rarer characters are left to byte fallback (keeps rare CJK out of the vocabulary)
max_chars = 50_000_000  # train on a random sample of lines holding at most this many characters (bounds RAM)
max_line_chars = 2048  # longer lines are cut into pieces this long (sentencepiece skips over-long sentences)
num_threads = os.cpu_count() or 1
seed = 0
bench = False  # train on bench_chars characters of ../shared/data and print wall time and peak RSS
bench_chars = 100_000_000

VERIFY_LINES = 1000  # sampled lines that must round-trip and agree with tokenizer.json after training


def lines_of(documents):
    """Training sentences: the non-empty lines of every document, cut to max_line_chars. sentencepiece learns from
    lines, so the newline itself is never a piece it learns; byte fallback gives it the single id <0x0A>."""
    for doc in documents:
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            for start in range(0, len(line), max_line_chars):
                yield line[start:start + max_line_chars]


def sample_lines(lines, budget, rng):
    """A uniform random sample of a stream of lines, holding at most `budget` characters, in one pass.

    Every line draws a random key; we keep exactly the lines whose key is below a threshold, lowering the threshold
    (evicting the highest key) whenever the kept lines exceed the budget. Memory: the budget plus one line."""
    heap, total, threshold = [], 0, 1.0  # heap of (-key, line): the highest key on top
    for line in lines:
        key = rng.random()
        if key >= threshold:
            continue
        heapq.heappush(heap, (-key, line))
        total += len(line)
        while total > budget:
            neg_key, evicted = heapq.heappop(heap)
            threshold, total = -neg_key, total - len(evicted)
    return [line for _, line in heap]


# ---- training ---------------------------------------------------------------------------------------------------

def train(documents):
    """Sample the documents' lines and train on them; return (Tokenizer, VERIFY_LINES of the sampled lines,
    sentencepiece's log)."""
    specials = [UNK, BOS, EOS, PAD, IM_START, IM_END]
    if model_type not in ("bpe", "char"):
        raise SystemExit(f"model_type must be 'bpe' or 'char', got {model_type!r}")
    if model_type == "bpe" and vocab_size < 256 + len(specials) + 100:
        raise SystemExit(f"vocab_size={vocab_size} is too small: the 256 byte pieces and {len(specials)} special "
                         f"tokens come first; use at least {256 + len(specials) + 100}")
    lines = tqdm(lines_of(documents), desc="reading lines", unit=" lines", unit_scale=True, mininterval=1.0)
    sample = sample_lines(lines, max_chars, random.Random(seed))
    lines.close()
    if not sample:
        raise SystemExit(f"{input or 'the default corpus'}: no text to train on (empty files or blank lines only)")
    print(f"training on {len(sample):,} sampled lines, {sum(map(len, sample)):,} characters")
    kept = sample[:VERIFY_LINES]

    def drain(lines):  # hand the lines over to sentencepiece, dropping our copy as it takes them
        while lines:
            yield lines.pop()

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    # sentencepiece logs from C++ straight to file descriptor 2; `logstream` points that at a file for the call, so
    # the console keeps one line and out_dir gets the log (written only with the tokenizer, after its checks)
    log = tempfile.TemporaryFile()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=drain(sample), model_writer=model, logstream=log,
            model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=model_type != "char",
            character_coverage=character_coverage, byte_fallback=True,
            # exact round trip: no NFKC, no dummy "▁" at the start, no collapsing of repeated spaces, and the space
            # ("▁") always a piece: a corpus without spaces (Chinese) would otherwise byte-encode it as "▁"'s UTF-8
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            required_chars="▁",
            split_digits=True, allow_whitespace_only_pieces=True,  # LLaMA's choices: digits one by one, indentation
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=[IM_START, IM_END],
            max_sentence_length=4 * max_line_chars + 16,  # in bytes; a UTF-8 character is at most 4
            num_threads=num_threads, minloglevel=0)
    except RuntimeError as e:  # e.g. more required characters than vocab_size
        raise SystemExit(f"sentencepiece training failed: {e}") from None
    finally:
        log.seek(0)
        log_text = log.read().decode("utf-8", errors="replace")
        log.close()
    return Tokenizer.from_sentencepiece(model.getvalue()), kept, log_text


def verify(tok, samples):
    """The checks the seeds skipped: tab, newline and every special token are single ids that decode back; sample
    lines round-trip exactly; and the tokenizer.json we export gives the same ids as sentencepiece."""
    for s in ["\t", "\n", *tok.special_tokens]:
        ids = tok.encode(s)
        if len(ids) != 1 or tok.decode(ids) != s:
            raise RuntimeError(f"{s!r} does not encode to a single reversible id: {ids}")
    hf = _tokenizers_from_spm(tok.sp_model)
    for text in samples:
        ids = tok.encode(text)
        if tok.decode(ids) != text:
            raise RuntimeError(f"{text[:80]!r} decodes back as {tok.decode(ids)[:80]!r}")
        if hf.encode(text, add_special_tokens=False).ids != ids:
            raise RuntimeError(f"tokenizer.json disagrees with tokenizer.model on {text[:80]!r}")


def main():
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"out_dir {out_dir} is a file, not a folder")
    documents = (readers.iter_texts(input, text_field=text_field, txt_split=txt_split, encoding=encoding,
                                    lenient=lenient) if input else default_documents())
    t0 = time.time()
    tok, sample, log_text = train(documents)
    t_train = time.time() - t0
    edge = ["a\tb\n\nc  d   e", "中文，繁體。 😀👍🏽", "<|im_start|>user\nhi<|im_end|>\n", "x = [1,  22, 333]\n    y"]
    try:
        verify(tok, sample + edge)
    except RuntimeError as e:
        raise SystemExit(f"the trained tokenizer failed its check, so nothing was written to {out_dir}: {e}") from None
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sentencepiece.log"), "w", encoding="utf-8") as f:
        f.write(log_text)
    log_lines = log_text.count("\n")
    print(f"trained a {model_type} tokenizer: {tok.vocab_size} ids in {t_train:.1f}s; specials "
          f"{tok.special_tokens}; wrote {out_dir}/tokenizer.model, tokenizer.json, tokenizer_config.json "
          f"(sentencepiece's {log_lines}-line log: sentencepiece.log)")
    return t_train


# ---- benchmark --------------------------------------------------------------------------------------------------

def bench_corpus(path, n_chars):
    """n_chars characters of the English and Chinese pretraining text in ../shared/data (~21M characters), streamed
    to `path`. Plain repetition would let sentencepiece count each distinct word once and flatter the benchmark, so
    each further pass maps the text through a different permutation of its own letters and CJK characters: same
    alphabet and statistics, new words. (JSON files contribute every string they hold, e.g. the poems' lines.)"""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
    folders = [os.path.join(root, d) for d in ("pretrain_en", "pretrain_zh")]
    if not all(os.path.isdir(d) for d in folders):
        raise SystemExit(f"--bench needs {folders}")
    paths = sorted(os.path.join(r, n) for d in folders for r, _, ns in os.walk(d) for n in ns
                   if n not in ("SOURCE.json", "LICENSE", "README"))

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (list, dict)):
            for v in (x.values() if isinstance(x, dict) else x):
                yield from strings(v)

    def texts(p):
        if p.removesuffix(".gz").endswith(".json"):
            with (gzip.open(p, "rt", encoding="utf-8") if p.endswith(".gz") else open(p, encoding="utf-8")) as f:
                yield "\n".join(strings(json.load(f)))
        else:
            yield from readers.iter_texts(p, text_field="text,review", lenient=True)  # Gutenberg: a few Latin-1 lines

    written, seen, table = 0, set(), {}
    with open(path, "w", encoding="utf-8") as out:
        for rep in itertools.count():
            for p in paths:
                for text in texts(p):
                    if rep == 0:
                        seen.update(text)
                    text = text.translate(table)[:n_chars - written]
                    out.write(text if text.endswith("\n") else text + "\n")
                    written += len(text)
                    if written >= n_chars:
                        return
            letters = sorted(c for c in seen if c.isascii() and c.isalpha())
            for group in (letters, sorted(c for c in seen if "\u4e00" <= c <= "\u9fff")):
                shuffled = random.Random(rep).sample(group, len(group))
                table.update(zip(map(ord, group), shuffled))


def run_bench():
    global input, out_dir
    tmp = tempfile.mkdtemp(prefix="tokenizer_bench_")
    try:
        t0 = time.time()
        corpus = os.path.join(tmp, "corpus.txt")
        bench_corpus(corpus, bench_chars)
        t_corpus = time.time() - t0
        input, out_dir = corpus, os.path.join(tmp, "tokenizer")
        t1 = time.time()
        t_train = main()
        t_all = time.time() - t1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"bench: {bench_chars / 1e6:.0f}M characters (corpus built in {t_corpus:.0f}s), model_type={model_type} "
          f"vocab_size={vocab_size} max_chars={max_chars / 1e6:.0f}M num_threads={num_threads}: "
          f"training {t_train:.0f}s, training+verify+save {t_all:.0f}s, peak RSS {kib / 2**20:.2f} GiB")


if __name__ == "__main__":
    configurator.apply(globals(), sys.argv[1:])
    run_bench() if bench else main()
