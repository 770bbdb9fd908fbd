"""The one data layer: a data directory as data_process.py writes it, read and checked with one policy.

A data directory holds meta.json (format, dtype, vocab_size, token counts, tokenizer_sha256; pretrain: bytes, the
UTF-8 bytes of text behind each split, for bits per byte), the tokenizer that made it, and per split:
  pretrain  {split}.bin                                       one token stream, EOS after every document
  sft       {split}.bin, {split}_mask.bin (uint8), {split}_idx.npy (n + 1 record offsets)
  dpo       {split}.bin, {split}_idx.npy ((n, 4): prompt, chosen, rejected starts and the end)

Every reader (pretraining, SFT, DPO, eval's perplexity, quantization calibration) opens it through
open_data_dir(), which refuses, naming the file or key: a missing or broken meta.json, a format other than the
one asked for, data made by another tokenizer than the model's, and files whose size does not match meta.json
(an odd byte count, a truncated copy). data_process.py writes it with SplitWriter and write_meta.
"""
import json
import math
import os
import sys

import numpy as np

FORMATS = ("pretrain", "sft", "dpo")
MAKE_IT = "make it with data_process.py"


# --------------------------------------------------------------------------------------------------------- writing

def choose_dtype(vocab_size, forced="auto"):
    """uint16 while every id fits, else uint32; `forced` may ask for either (refused when ids would not fit)."""
    need = np.uint16 if vocab_size <= 65535 else np.uint32
    if forced == "auto":
        return need
    if forced not in ("uint16", "uint32"):
        raise SystemExit(f"dtype must be auto, uint16 or uint32, not {forced!r}")
    if np.dtype(forced).itemsize < np.dtype(need).itemsize and vocab_size > 65536:
        raise SystemExit(f"vocab_size {vocab_size} is too large for dtype {forced} (ids up to {vocab_size - 1} "
                         f"do not fit in 16 bits): use --dtype=uint32 or auto")
    return np.dtype(forced).type


def check_ids(ids, vocab_size):
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        raise SystemExit(f"the tokenizer produced id {int(ids.max())} outside its vocab_size {vocab_size}")


class SplitWriter:
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


def write_meta(out, tok, dtype, cfg, extra):
    """meta.json and the tokenizer beside the token files; `extra` holds the format's counts (train_tokens ...)."""
    meta = {"format": cfg["format"], "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, **extra,
            "tokenizer_sha256": tok.checksum(), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "config": {k: v for k, v in cfg.items() if k not in ("bench",)}}
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    tok.save_pretrained(out)
    return meta


# --------------------------------------------------------------------------------------------------------- reading

def read_meta(data_dir):
    """meta.json of a data directory, its required keys checked."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise SystemExit(f"data directory {data_dir}: not found; {MAKE_IT}")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; {MAKE_IT}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); {MAKE_IT} again")
    if not isinstance(meta, dict):
        raise SystemExit(f"{path}: expected a JSON object")
    for key in ("dtype", "vocab_size"):
        if key not in meta:
            raise SystemExit(f"{path}: key '{key}' is missing; {MAKE_IT} again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise SystemExit(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    meta.setdefault("format", "pretrain")  # data directories written before the key existed were all pretraining
    if meta["format"] not in FORMATS:
        raise SystemExit(f"{path}: format {meta['format']!r} is not one of {', '.join(FORMATS)}")
    return meta


def _tokenizer_of(folder):
    """The tokenizer saved in a folder, or None when it holds none."""
    from tokenizer import load_tokenizer, tokenizer_in
    return load_tokenizer(folder) if tokenizer_in(folder) else None


class DataDir:
    """An opened, checked data directory: .meta, .dtype, .tokenizer_dir (None when it holds no tokenizer) and the
    splits as memmaps (tokens), SFT records (sft) or preference records (dpo)."""

    def __init__(self, path, meta, tokenizer_dir):
        self.path, self.meta, self.tokenizer_dir = path, meta, tokenizer_dir
        self.format, self.dtype = meta["format"], np.dtype(meta["dtype"])

    def file(self, name):
        return os.path.join(self.path, name)

    def tokens(self, split):
        # a fresh memmap per call: a long-lived one keeps every page it touched resident
        return np.memmap(self.file(f"{split}.bin"), dtype=self.dtype, mode="r")

    def sft(self, split):
        return SFTData(self.tokens(split), np.memmap(self.file(f"{split}_mask.bin"), dtype=np.uint8, mode="r"),
                       np.load(self.file(f"{split}_idx.npy")))

    def dpo(self, split):
        return DPOData(self.tokens(split), np.load(self.file(f"{split}_idx.npy")))

    def check_files(self, splits):
        """Every file of the splits exists and has the size meta.json implies."""
        for split in splits:
            path = self.file(f"{split}.bin")
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: not found; {MAKE_IT}")
            size = os.path.getsize(path)
            if size % self.dtype.itemsize:
                raise SystemExit(f"{path}: {size} bytes is not a whole number of {self.dtype.name} tokens: the file "
                                 f"is damaged or not of this data directory; {MAKE_IT} again")
            want = self.meta.get(f"{split}_tokens")
            if want is not None and size // self.dtype.itemsize != want:
                raise SystemExit(f"{path}: {size // self.dtype.itemsize:,} tokens but meta.json says "
                                 f"{split}_tokens={want:,}: truncated or replaced; {MAKE_IT} again")
            if self.format == "pretrain":
                continue
            idx_path = self.file(f"{split}_idx.npy")
            if not os.path.isfile(idx_path):
                raise SystemExit(f"{idx_path}: not found; {MAKE_IT} again")
            try:
                idx = np.load(idx_path)
            except (ValueError, OSError, EOFError) as e:
                raise SystemExit(f"{idx_path}: unreadable ({e}); {MAKE_IT} again")
            end = int(idx[-1] if self.format == "sft" else idx[-1, -1]) if len(idx) else 0
            if end != size // self.dtype.itemsize:
                raise SystemExit(f"{idx_path}: its records end at token {end:,} but {path} holds "
                                 f"{size // self.dtype.itemsize:,}: the files do not belong together")
            if self.format == "sft":
                mask = self.file(f"{split}_mask.bin")
                if not os.path.isfile(mask) or os.path.getsize(mask) != size // self.dtype.itemsize:
                    raise SystemExit(f"{mask}: missing or not one byte per token of {path}; {MAKE_IT} again")


def open_data_dir(data_dir, fmt="pretrain", tokenizer=None, vocab_size=None, splits=("train", "val")):
    """Open a data directory for reading as format `fmt`, checked against the model's `tokenizer` (a Tokenizer;
    None: the model brings none, e.g. a fresh one that takes the data's) and its `vocab_size` (embedding rows).
    Data whose tokenizer is the model's plus added special tokens (meta.json's base_tokenizer_sha256 and
    added_tokens: ChatML's markers on a tokenizer without them) is accepted when the caller passes no vocab_size
    (it resizes the embeddings to meta.json's vocab_size itself). Refuses a format, tokenizer, vocabulary or size
    mismatch; warns when the data records no tokenizer."""
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, "meta.json")
    if meta["format"] != fmt:
        raise SystemExit(f"{path}: this is {meta['format']} data, not {fmt} data; make {fmt} data with "
                         f"python data_process.py --format={fmt}")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise SystemExit(f"{path}: vocab_size={meta['vocab_size']} but the model has only {vocab_size} embeddings: "
                         f"the data was made with a bigger vocabulary (pretrain.py from scratch: set vocab_size to at "
                         f"least the data's, or 0 to take it from meta.json)")
    data_tok = _tokenizer_of(data_dir)
    recorded = meta.get("tokenizer_sha256")
    if data_tok is not None and recorded is None:
        raise SystemExit(f"{path}: key 'tokenizer_sha256' is missing; {MAKE_IT} again")
    if data_tok is not None and data_tok.checksum() != recorded:
        raise SystemExit(f"{path}: tokenizer_sha256 {recorded[:12]}... does not match the tokenizer saved in "
                         f"{data_dir} ({data_tok.checksum()[:12]}...); {MAKE_IT} again")
    if data_tok is not None and data_tok.vocab_size != meta["vocab_size"]:
        raise SystemExit(f"{path}: vocab_size={meta['vocab_size']} but its tokenizer has {data_tok.vocab_size}")
    extends_model = tokenizer is not None and meta.get("base_tokenizer_sha256") == tokenizer.checksum()
    if tokenizer is not None and recorded is not None and tokenizer.checksum() != recorded and not extends_model:
        raise SystemExit(f"{data_dir} was tokenized with another tokenizer (sha256 {recorded[:12]}...) than the "
                         f"model's ({tokenizer.checksum()[:12]}...): its ids mean other tokens to this model. "
                         f"Re-run data_process.py with --tokenizer=<the model's folder>")
    if recorded is None:
        print(f"warning: {path} records no tokenizer_sha256 (and {data_dir} holds no tokenizer): NOT checked "
              f"against the model's tokenizer", file=sys.stderr)
    data = DataDir(data_dir, meta, data_dir if data_tok is not None else None)
    data.check_files(splits)
    return data


def token_stream(path, tok, split="val"):
    """A 1-D token array for perplexity and calibration: a data directory's split, a .bin inside a data directory
    (both checked against `tok` by open_data_dir), or text files read with readers.iter_texts, EOS after each."""
    if os.path.isfile(path) and path.endswith(".bin"):
        folder, split = os.path.dirname(path) or ".", os.path.basename(path)[:-len(".bin")]
        return open_data_dir(folder, tokenizer=tok, splits=(split,)).tokens(split)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        return open_data_dir(path, tokenizer=tok, splits=(split,)).tokens(split)
    import readers
    eos = [tok.eos_id] if tok.eos_id is not None else []
    tokens = []
    for ids in map(tok.encode, readers.iter_texts(path)):
        tokens.extend(ids + eos)
    if not tokens:
        raise SystemExit(f"{path}: no text to score")
    return np.array(tokens, dtype=np.int64)


def split_bytes(meta, split):
    """(tokens, UTF-8 bytes of their text) of a pretraining split, for bits_per_byte; None for data made before
    data_process.py recorded bytes, or SFT/DPO data (whose loss covers only the replies)."""
    if meta.get("format") != "pretrain" or split not in meta.get("bytes", {}):
        return None
    return meta[f"{split}_tokens"], meta["bytes"][split]


def stream_bytes(path, split="val"):
    """UTF-8 bytes of the text behind token_stream(path, tok, split): a data directory's record (None when its
    meta.json has none), or the text of the files themselves."""
    if os.path.isfile(path) and path.endswith(".bin"):
        path, split = os.path.dirname(path) or ".", os.path.basename(path)[:-len(".bin")]
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        counted = split_bytes(read_meta(path), split)
        return counted[1] if counted else None
    import readers
    return sum(len(text.encode("utf-8")) for text in readers.iter_texts(path))


def bits_per_byte(loss, tokens, n_bytes):
    """A mean loss in nats over `tokens` tokens, as bits per byte of the `n_bytes` bytes of text they encode: the
    figure that compares models with different tokenizers."""
    return loss * tokens / (n_bytes * math.log(2))


class SFTData:
    """Memmapped SFT records: data[i] -> (input_ids, labels) int64, labels = -100 where nothing is trained."""

    def __init__(self, tokens, mask, offsets):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.tokens[a:b].astype(np.int64)
        return ids, np.where(self.mask[a:b] == 1, ids, -100)


class DPOData:
    """Memmapped preference records: data[i] -> (prompt_ids, chosen_ids, rejected_ids) int64."""

    def __init__(self, tokens, index):
        self.tokens, self.index = tokens, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        p, c, r, e = self.index[i]
        return tuple(self.tokens[a:b].astype(np.int64) for a, b in ((p, c), (c, r), (r, e)))


def load_sft(data_dir, split):
    return open_data_dir(data_dir, "sft", splits=(split,)).sft(split)


def load_dpo(data_dir, split):
    return open_data_dir(data_dir, "dpo", splits=(split,)).dpo(split)
