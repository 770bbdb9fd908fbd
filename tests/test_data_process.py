"""data_process.py and the modules under it (readers, clean, dedup, chat_data): readers, cleaning, dedup, token
streams, SFT/DPO records, bad input. Tiny inputs in tmp_path;
a char-level stand-in tokenizer (exact decode, any vocab size) plus a real sentencepiece BPE from train_tokenizer.py."""
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import chat_data
import clean
import data
import data_process as dp
import dedup
import readers
from tokenizer import CHATML_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class CharTokenizer:
    """Stand-in with the Tokenizer interface: one id per character (6 + code point), ChatML specials."""

    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, IM_START: 4, IM_END: 5}
    chat_template = CHATML_TEMPLATE  # what apply_chat_template below renders

    def __init__(self, vocab_size=65000):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.unk_id = vocab_size, 1, 2, 3, 0
        self.special_tokens = dict(self.specials)

    def encode(self, text, bos=False, eos=False):
        ids, i = [], 0
        while i < len(text):
            sp = next((s for s in (IM_START, IM_END) if text.startswith(s, i)), None)
            if sp:
                ids.append(self.specials[sp])
                i += len(sp)
            else:
                ids.append(6 + ord(text[i]) if 6 + ord(text[i]) < self.vocab_size else 0)
                i += 1
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False):
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids):
        names = {v: k for k, v in self.specials.items()}
        return "".join(names[i] if i in names else chr(i - 6) for i in map(int, ids))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def checksum(self):
        return f"chars-{self.vocab_size}"

    def save_pretrained(self, out_dir):
        with open(os.path.join(out_dir, "stand_in_tokenizer.json"), "w") as f:
            json.dump({"vocab_size": self.vocab_size}, f)


def cfg(tmp_path, **kw):
    if "out_dir" not in kw:
        kw["out_dir"] = str(tmp_path / "out")
    kw.setdefault("num_workers", 1)
    return dp.config(**kw)


def docs_of(tmp_path, **kw):
    """The documents the readers produce for cfg(**kw)['input'] (before cleaning)."""
    c = cfg(tmp_path, **kw)
    files, _ = readers.expand_inputs(c["input"], c["exclude"])
    return list(readers.iter_documents(files, c, readers.Issues(c["lenient"]), {}))


def write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return str(path)


def read_bin(out, split):
    meta = json.load(open(os.path.join(out, "meta.json")))
    return meta, np.fromfile(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"])


def split_docs(ids, eos):
    cuts = np.flatnonzero(ids == eos)
    return [ids[a + 1 if k else 0:b] for k, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


# ------------------------------------------------------------------------------------------------------ readers

@pytest.mark.parametrize("gz", [False, True])
def test_every_reader_format(tmp_path, gz):
    ext = ".gz" if gz else ""
    t = tmp_path
    assert docs_of(t, input=write(t / f"a.txt{ext}", "one\n\ntwo\r\nthree\n", gz)) == ["one", "two", "three"]
    assert docs_of(t, input=write(t / f"b.txt{ext}", "p1 a\np1 b\n\n\np2\n", gz), txt_split="blank") == \
        ["p1 a\np1 b", "p2"]
    assert docs_of(t, input=write(t / f"c{ext}", "f1\n%\nf2\nx\n%\n", gz), txt_split="%") == ["f1", "f2\nx"]
    assert docs_of(t, input=write(t / f"d.txt{ext}", "l1\n\nl2\n", gz), txt_split="file") == ["l1\n\nl2"]
    assert docs_of(t, input=write(t / f"e.jsonl{ext}", '{"text": "j1"}\n\n{"text": "j2", "x": 1}\n', gz)) == \
        ["j1", "j2"]
    pretty = json.dumps([{"text": "k1"}, {"text": "k\n2"}, "k3"], indent=2)  # a pretty-printed JSON list
    assert docs_of(t, input=write(t / f"f.json{ext}", pretty, gz)) == ["k1", "k\n2", "k3"]
    assert docs_of(t, input=write(t / f"g.json{ext}", '{"text": "single"}', gz)) == ["single"]
    assert docs_of(t, input=write(t / f"h.json{ext}", '{"text": "l1"}\n{"text": "l2"}\n', gz)) == ["l1", "l2"]
    csv_text = 'label,review\n1,"quoted, with comma"\n0,"two\nlines"\n1,plain\n'
    assert docs_of(t, input=write(t / f"i.csv{ext}", csv_text, gz), text_field="review") == \
        ["quoted, with comma", "two\nlines", "plain"]
    assert docs_of(t, input=write(t / f"j.csv{ext}", "a,x1\nb,x2\n", gz), text_field="#1") == ["x1", "x2"]


def test_nested_fields_join_like_chinese_poetry(tmp_path):
    poems = [{"title": "t", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
             {"content": [{"chapter": "c", "paragraphs": ["甲", "乙"]}, {"paragraphs": ["丙"]}]}]
    path = write(tmp_path / "p.json", json.dumps(poems, ensure_ascii=False))
    assert docs_of(tmp_path, input=path, text_field="paragraphs,content") == \
        ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "甲\n乙\n丙"]


def test_folders_globs_and_exclusions(tmp_path):
    write(tmp_path / "c" / "b.txt", "b1\n")
    write(tmp_path / "c" / "a" / "x.jsonl.gz", '{"text": "a1"}\n', gz=True)
    write(tmp_path / "c" / "SOURCE.json", '{"dir": "x"}')  # excluded by name
    write(tmp_path / "c" / "notes.md", "# markdown is text\n")
    write(tmp_path / "c" / "logo.png", "skipped: unknown extension")
    write(tmp_path / "c" / "song100", "no extension: text\n")
    files, skipped = readers.expand_inputs(str(tmp_path / "c"))
    assert [os.path.relpath(f, tmp_path / "c") for f in files] == ["b.txt", "notes.md", "song100", "a/x.jsonl.gz"]
    assert sorted(os.path.basename(s) for s in skipped) == ["SOURCE.json", "logo.png"]
    assert sorted(docs_of(tmp_path, input=str(tmp_path / "c" / "**" / "*.*"))) == ["# markdown is text", "a1", "b1"]
    assert docs_of(tmp_path, input=f"{tmp_path / 'c' / 'b.txt'},{tmp_path / 'c' / 'song100'}") == \
        ["b1", "no extension: text"]


def test_json_streaming_reads_big_items_and_reports_the_right_line(tmp_path):
    big = [{"text": "x" * 300_000}, {"text": "\n".join(["y"] * 50)}]
    lines = json.dumps(big, indent=1).split("\n")
    path = write(tmp_path / "big.json", "\n".join(lines))
    assert [len(d) for d in docs_of(tmp_path, input=path)] == [300_000, 99]
    items = [json.dumps({"text": f"item {i}"}, indent=1) for i in range(5)]
    items[3] = items[3].replace('"item 3"', '"item 3",,')  # malformed, on the 2nd line of item 3 (0-based)
    text = "[\n" + ",\n".join(items) + "\n]"
    bad_line = text.split("\n").index(next(x for x in text.split("\n") if "item 3" in x)) + 1
    with pytest.raises(SystemExit, match=rf"bad\.json:{bad_line}: malformed JSON"):
        docs_of(tmp_path, input=write(tmp_path / "bad.json", text))


def test_parquet_reader(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
        with pytest.raises(SystemExit, match="t.parquet: reading .parquet needs pyarrow"):
            docs_of(tmp_path, input=str(path))
        return
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), path)
    assert docs_of(tmp_path, input=str(path)) == ["p1", "p2"]


def test_real_corpora_read(shared_data):
    poetry = os.path.join(shared_data, "pretrain_zh", "chinese_poetry", "全唐诗", "唐诗三百首.json.gz")
    docs = docs_of(None, input=poetry, text_field="paragraphs", out_dir="x")
    assert len(docs) == 366 and all(d.count("\n") >= 1 for d in docs[:10])
    fortunes = os.path.join(shared_data, "pretrain_zh", "fortunes_zh", "tang300")
    assert len(docs_of(None, input=fortunes, txt_split="%", out_dir="x")) > 250
    reviews = os.path.join(shared_data, "pretrain_zh", "chinese_reviews", "waimai_10k.csv")
    assert docs_of(None, input=reviews, text_field="review", out_dir="x")[0] == "很快，好吃，味道足，量大"


# ----------------------------------------------------------------------------------------------------- cleaning

CLEANING_CASES = [  # (input, expected); the first ones are real lines from ../shared/data/pretrain_zh
    ('距离川沙公路较近,但是公交指示不对,如果是"蔡陆线"的话,会非常麻烦.建议用别的路线.房间较为简单.',  # ChnSentiCorp
     '距离川沙公路较近，但是公交指示不对，如果是"蔡陆线"的话，会非常麻烦。建议用别的路线。房间较为简单。'),
    ("有免费的插线板、水果刀。。。等一系列的日常用品免费提供，很细心。酒店21：30-24点有广式晚茶",  # NFKC + collapse
     "有免费的插线板、水果刀。等一系列的日常用品免费提供，很细心。酒店21:30-24点有广式晚茶"),
    ("前台值此人员办理手续也非常快．", "前台值此人员办理手续也非常快。"),  # full-width full stop
    ("\x1b[33m    -- Debian \x1b[32m《行为准则》\x1b[m第一条\x1b[m", "-- Debian 《行为准则》第一条"),  # fortunes-zh
    ("ＡＢＣ１２３　全角！！！真的吗？？", "ABC123 全角！真的吗？"),
    ("好的, 我们走吧!OK", "好的，我们走吧！OK"),
    ("(注:见上)与f(x)是函数", "（注：见上）与f(x)是函数"),
    ("Hello, world... It costs 3.14 (see v1.2)!!", "Hello, world... It costs 3.14 (see v1.2)!"),
    ("文件名是 data.txt，共1,000行", "文件名是 data.txt，共1,000行"),
    ("……两个字——省略号", "……两个字——省略号"),
    ("ctrl\x00\x07chars\u200b and\tkeep\ntabs\r\nnewlines\ufeff", "ctrlchars and\tkeep\ntabs\nnewlines"),
]


@pytest.mark.parametrize("raw,expected", CLEANING_CASES)
def test_cleaning_rules(raw, expected):
    assert clean.clean_text(raw, dp.config(), __import__("collections").Counter()) == expected


def test_cleaning_counts_and_final_period():
    counts = __import__("collections").Counter()
    c = dp.config(final_period=True)
    assert clean.clean_text("\x1b[1m春眠不觉晓\x1b[0m", c, counts) == "春眠不觉晓。"
    assert clean.clean_text("no period", c, counts) == "no period."
    assert clean.clean_text("已经有了！", c, counts) == "已经有了！"
    assert counts["ansi_codes_removed"] == 2 and counts["final_period_added"] == 2


def test_cleaning_real_fortunes_file(shared_data):
    path = os.path.join(shared_data, "pretrain_zh", "fortunes_zh", "chinese.gz")
    raw = docs_of(None, input=path, txt_split="%", out_dir="x")[:50]
    assert any("\x1b[" in d for d in raw)
    cleaned = [clean.clean_text(d, dp.config(), __import__("collections").Counter()) for d in raw]
    assert not any("\x1b" in d or "[m" in d for d in cleaned)
    assert "《行为准则》第一条" in cleaned[0]


# ------------------------------------------------------------------------------------------ token streams, dedup

def test_pretrain_eos_after_every_document_and_meta(tmp_path):
    docs = [f"document number {i}: " + "word " * (i % 7 + 3) for i in range(40)]
    path = write(tmp_path / "d.txt", "\n".join(docs) + "\n")
    tok = CharTokenizer()
    meta = dp.run(cfg(tmp_path, input=path, near_dedup=False), tok=tok)
    out = str(tmp_path / "out")
    got = []
    for split in ("train", "val"):
        meta, ids = read_bin(out, split)
        assert meta[f"{split}_tokens"] == len(ids) and ids[-1] == tok.eos_id
        assert (ids == tok.eos_id).sum() == meta[f"{split}_docs"]
        got += [tok.decode(d) for d in split_docs(ids, tok.eos_id)]
    assert sorted(got) == sorted(d.strip() for d in docs)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 65000 and meta["eos_id"] == 2
    assert meta["tokenizer_sha256"] == tok.checksum() and meta["sources"] == [path]
    assert 0.05 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.15
    assert os.path.exists(os.path.join(out, "stand_in_tokenizer.json"))
    dp.run(cfg(tmp_path, input=path, near_dedup=False, bos=True), tok=tok)
    _, ids = read_bin(out, "train")
    assert all(d[0] == tok.bos_id for d in split_docs(ids, tok.eos_id))


def test_two_workers_write_the_same_bytes(tmp_path):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "数据", "清洗"]) for _ in range(30)) for _ in range(300)]
    path = write(tmp_path / "d.txt", "\n".join(docs))
    outs = []
    for w in (1, 2):
        dp.run(cfg(tmp_path, input=path, num_workers=w, out_dir=str(tmp_path / f"w{w}")), tok=CharTokenizer())
        outs.append([read_bin(str(tmp_path / f"w{w}"), s)[1] for s in ("train", "val")])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_dtype_uint32_for_big_vocab(tmp_path):
    path = write(tmp_path / "d.txt", "plain text line one\nline two has \ufffd a high id\n")
    tok = CharTokenizer(vocab_size=70000)
    meta = dp.run(cfg(tmp_path, input=path, val_fraction=0.0), tok=tok)
    _, ids = read_bin(str(tmp_path / "out"), "train")
    assert meta["dtype"] == "uint32" and ids.dtype == np.uint32 and 6 + 0xFFFD in ids  # 65539 survives
    assert data.choose_dtype(65535) is np.uint16 and data.choose_dtype(65536) is np.uint32
    with pytest.raises(SystemExit, match="vocab_size 70000 is too large for dtype uint16"):
        dp.run(cfg(tmp_path, input=path, dtype="uint16"), tok=tok)


def test_exact_and_near_dedup(tmp_path):
    rng = random.Random(1)
    words = "the of and to in is was for on that with as by at from his her it an be this which or".split()
    base = [" ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(120)) for _ in range(6)]
    near = base[0].split()
    for k in (10, 50, 90):
        near[k] = "changed"
    docs = base + [base[1], " ".join(near), base[2].upper()]  # exact dup, ~3 words changed, case-only change
    path = write(tmp_path / "d.txt", "\n".join(docs))
    meta = dp.run(cfg(tmp_path, input=path), tok=CharTokenizer())
    c = meta["counts"]
    assert c["removed_exact_dup"] == 1 and c["removed_near_dup"] == 2 and c["kept"] == 6
    meta = dp.run(cfg(tmp_path, input=path, near_dedup=False, dedup=False), tok=CharTokenizer())
    assert meta["counts"]["kept"] == 9


def test_minhash_estimates_jaccard_similarity():
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(500)]

    def shingles(t, n=5):
        t = " ".join(t.lower().split()).ljust(n)
        return {t[i:i + n] for i in range(len(t) - n + 1)}

    errors = []
    for _ in range(60):
        a = [rng.choice(vocab) for _ in range(rng.choice([10, 100, 1000]))]
        b = [w if rng.random() > rng.random() * 0.5 else rng.choice(vocab) for w in a]
        x, y = " ".join(a), " ".join(b)
        exact = len(shingles(x) & shingles(y)) / len(shingles(x) | shingles(y))
        sig = dedup.minhash([x, y], 5, 128)
        errors.append(np.mean(sig[0] == sig[1]) - exact)
    assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.06  # ~sqrt(J(1-J)/128) for classic MinHash
    single = dedup.minhash(["only one text here"], 5, 128)
    assert np.array_equal(single[0], dedup.minhash(["other", "only one text here"], 5, 128)[1])
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 400))) for _ in range(20)]
    assert np.array_equal(dedup.minhash(texts, 5, 128), dedup.minhash(texts, 5, 128, chunk=50))  # pieces merge exactly


# -------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_name_file_and_line(tmp_path):
    t = tmp_path
    cases = [
        (write(t / "latin1.txt", b"fine\nCaf\xe9 au lait\n"), {}, r"latin1\.txt:2: not valid utf-8"),
        (write(t / "bad.jsonl", '{"text": "ok"}\n{"text": "no end\n'), {}, r"bad\.jsonl:2: malformed JSON"),
        (write(t / "latin1.json", b'[{"text": "ok"},\n {"text": "caf\xe9"}]'), {}, r"latin1\.json:2: not valid utf-8"),
        (write(t / "field.jsonl", '{"text": "ok"}\n{"body": "x"}\n'), {}, r"field\.jsonl:2: missing field text"),
        (write(t / "col.csv", "a,b\n1,2\n"), {"text_field": "review"}, r"col\.csv:1: no column review"),
        (write(t / "short.csv", "a,review\n1,fine\n2\n"), {"text_field": "review"}, r"short\.csv:3: row has 1"),
        (write(t / "empty.txt", "\n\n"), {}, "empty input"),
        (str(t / "missing.txt"), {}, r"missing\.txt: no such file"),
        (write(t / "ok.txt", "a\nb\n"), {"txt_split": "lines"}, "txt_split must be line, blank, file"),
        (write(t / "one.txt", "a single document\n"), {}, "too few for a train/val split"),
    ]
    for path, extra, pattern in cases:
        with pytest.raises(SystemExit, match=pattern):
            dp.run(cfg(t, input=path, **extra), tok=CharTokenizer())
        assert not list((t / "out").glob("*.tmp"))  # nothing half-written is left behind


def test_numbers_out_of_range_are_refused_naming_the_key(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"instruction": "q", "output": "a"}))
    for fmt, key, value, pattern in [("sft", "max_len", -5, "max_len=-5: must be at least 32 tokens for --format=sft"),
                                     ("dpo", "max_len", 16, "max_len=16: must be at least 32"),
                                     ("pretrain", "val_fraction", 1.0, r"val_fraction=1.0: must be in \[0, 1\)"),
                                     ("pretrain", "near_dup_threshold", 0.0, "near_dup_threshold=0.0: must be in"),
                                     ("pretrain", "min_chars", -1, "min_chars=-1: must be 0 or more"),
                                     ("sft", "num_workers", -2, "num_workers=-2: must be 0")]:
        with pytest.raises(SystemExit, match=pattern):
            dp.run(cfg(tmp_path, input=path, format=fmt, **{key: value}), tok=CharTokenizer())
        assert not (tmp_path / "out").exists()
    dp.run(cfg(tmp_path, input=write(tmp_path / "p.txt", "\n".join(f"document {i}" for i in range(20))),
               max_len=5), tok=CharTokenizer())  # pretraining does not use max_len


FAKE_PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 42 >>\nstream\nx\x9c\xf3H\xcd\xc9\xc9\x07\nendstream\n"


def test_binary_files_are_skipped_with_a_count_never_tokenized(tmp_path, capsys):
    write(tmp_path / "c" / "docs.jsonl", "\n".join(json.dumps({"text": f"文档 number {i}"}, ensure_ascii=False)
                                                 for i in range(20)))
    write(tmp_path / "c" / "paper.pdf.txt", FAKE_PDF)
    write(tmp_path / "c" / "logo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    report = write(tmp_path / "report.pdf", FAKE_PDF)
    meta = dp.run(cfg(tmp_path, input=f"{tmp_path / 'c'},{report}", near_dedup=False), tok=CharTokenizer())
    out = capsys.readouterr().out
    assert "reading 1 file(s); skipped 3 file(s): 3 binary (not text: never read): " in out
    assert all(name in out for name in ("paper.pdf.txt", "logo.txt", "report.pdf"))
    assert [os.path.basename(s) for s in meta["sources"]] == ["docs.jsonl"] and meta["counts"]["docs_read"] == 20
    with pytest.raises(SystemExit, match=r"report\.pdf: no readable files \(skipped 1 file\(s\): 1 binary"):
        dp.run(cfg(tmp_path, input=report, format="sft"), tok=CharTokenizer())


def test_csv_chat_records_are_mapped_like_their_json_layouts(tmp_path):
    tok = CharTokenizer()
    rows = "".join(f'把第{i}句翻译成英文,"你好, 世界 {i}",Hello world {i}\n' for i in range(12))
    path = write(tmp_path / "alpaca.csv", "instruction,input,output\n" + rows)
    dp.run(cfg(tmp_path, input=path, format="sft"), tok=tok)
    ids, labels = data.load_sft(str(tmp_path / "out"), "train")[0]
    assert tok.decode(ids) == tok.apply_chat_template(conv(("user", "把第0句翻译成英文\n\n你好, 世界 0"),
                                                           ("assistant", "Hello world 0")), add_generation_prompt=False)
    assert tok.decode(ids[labels != -100]) == f"Hello world 0{IM_END}\n"
    rows = "".join(f"问题 {i}?,好的回答 {i},坏的回答 {i}\n" for i in range(12))
    path = write(tmp_path / "pref.csv", "prompt,chosen,rejected\n" + rows)
    dp.run(cfg(tmp_path, input=path, format="dpo", out_dir=str(tmp_path / "dpo")), tok=tok)
    p, c, r = data.load_dpo(str(tmp_path / "dpo"), "train")[0]
    assert tok.decode(p) == f"{IM_START}user\n问题 0?{IM_END}\n{IM_START}assistant\n"
    assert tok.decode(c) == f"好的回答 0{IM_END}\n" and tok.decode(r) == f"坏的回答 0{IM_END}\n"
    path = write(tmp_path / "qa.csv", "question,answer\n" + "".join(f"问{i},答{i}\n" for i in range(12)))
    with pytest.raises(SystemExit, match=r"qa\.csv:1: the columns question, answer hold no sft record layout: a CSV "
                                         r"of sft records needs the columns instruction,output or prompt,completion"):
        dp.run(cfg(tmp_path, input=f"{tmp_path / 'alpaca.csv'},{path}", format="sft", out_dir=str(tmp_path / "qa")),
               tok=tok)
    assert not (tmp_path / "qa").exists()  # refused before anything was written
    meta = dp.run(cfg(tmp_path, input=path, format="sft", rename="question:prompt,answer:completion",
                      out_dir=str(tmp_path / "qa")), tok=tok)
    assert meta["counts"]["records_read"] == 12 and meta["counts"].get("skipped_bad_records", 0) == 0


def test_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit, match="out_dir .*out is a file, not a folder"):
        dp.run(cfg(tmp_path, input=str(tmp_path / "missing.txt")), tok=CharTokenizer())  # no reading either


def test_lenient_skips_are_counted_and_listed(tmp_path):
    lines = [json.dumps({"text": f"good document {i}"}) for i in range(10)]
    lines[3] = '{"text": broken'
    lines[6] = '{"other": 1}'
    path = write(tmp_path / "mixed.jsonl", "\n".join(lines).encode() + b'\n{"text": "bad \xff byte"}\n')
    meta = dp.run(cfg(tmp_path, input=path, lenient=True, near_dedup=False), tok=CharTokenizer())
    assert meta["counts"]["skipped_bad_records"] == 3 and meta["counts"]["kept"] == 8
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in meta["skipped_examples"]] == ["4", "7", "11"]


def test_real_latin1_lines_in_gutenberg(shared_data, tmp_path):
    path = os.path.join(shared_data, "pretrain_en", "gutenberg", "shakespeare-caesar.txt")
    with pytest.raises(SystemExit, match=r"shakespeare-caesar\.txt:119: not valid utf-8"):
        docs_of(tmp_path, input=path)
    assert any("Cæsar" in d for d in docs_of(tmp_path, input=path, encoding="latin-1"))
    assert len(docs_of(tmp_path, input=path, lenient=True)) > 2000


# ---------------------------------------------------------------------------------------------- chat records

def conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_sft_record_layouts():
    want = conv(("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "Sum\n\n1 2"),
                ("assistant", "3"))
    assert chat_data.to_conversation({"system": "Be brief.", "history": [["hi", "hello"]], "instruction": "Sum",
                               "input": "1 2", "output": "3"}) == want
    share = {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt",
             "value": "hello"}, {"from": "user", "value": "Sum\n\n1 2"}, {"from": "assistant", "value": "3"}]}
    assert chat_data.to_conversation(share) == want
    assert chat_data.to_conversation({"messages": want}) == want
    counts = __import__("collections").Counter()
    assert chat_data.to_conversation({"messages": want + conv(("user", "unanswered"))}, counts) == want
    assert counts["trailing_user_turns_dropped"] == 1
    bad = [({"messages": conv(("user", "a"), ("user", "b"), ("assistant", "c"))}, "alternate"),
           ({"messages": conv(("user", "a"), ("assistant", "  "))}, "empty"),
           ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role"),
           ({"messages": conv(("assistant", "first"))}, "alternate"),
           ({"instruction": "x"}, "not a chat record"),
           ({"conversations": [{"from": "human", "value": 3}]}, "must be a string")]
    for rec, msg in bad:
        with pytest.raises(ValueError, match=msg):
            chat_data.to_conversation(rec)


def test_preference_record_layouts():
    p = conv(("user", "Q?"))
    assert chat_data.to_preference({"prompt": "Q?", "chosen": "good", "rejected": "bad"}) == (p, "good", "bad")
    assert chat_data.to_preference({"conversations": [{"from": "human", "value": "Q?"}],
                             "chosen": {"from": "gpt", "value": "good"},
                             "rejected": {"from": "gpt", "value": "bad"}}) == (p, "good", "bad")
    assert chat_data.to_preference({"conversations": [{"from": "human", "value": "Q?"}], "chosen": "good",
                             "rejected": "bad"}) == (p, "good", "bad")
    assert chat_data.to_preference({"instruction": "Q?", "input": "", "chosen": "good", "rejected": "bad"}) == \
        (p, "good", "bad")
    hh = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q?\n\nAssistant: "
    assert chat_data.to_preference({"chosen": hh + "good", "rejected": hh + "bad"}) == \
        (conv(("user", "Q1"), ("assistant", "A1"), ("user", "Q?")), "good", "bad")
    trl = {"chosen": p + conv(("assistant", "good")), "rejected": p + conv(("assistant", "bad"))}
    assert chat_data.to_preference(trl) == (p, "good", "bad")
    bad = [({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical"),
           ({"chosen": hh + "good", "rejected": hh}, "rejected reply is empty"),
           ({"chosen": hh + "x", "rejected": "\n\nHuman: other\n\nAssistant: y"}, "differ before"),
           ({"prompt": "Q", "chosen": {"from": "human", "value": "x"}, "rejected": "y"}, "assistant reply"),
           ({"prompt": "Q", "chosen": "x"}, "needs 'chosen' and 'rejected'")]
    for rec, msg in bad:
        with pytest.raises(ValueError, match=msg):
            chat_data.to_preference(rec)


REAL_CHAT = [  # (folder, format, records converted without error, total)
    ("sft_en/alpaca_en_demo", "sft", 999, 999), ("sft_en/identity", "sft", 91, 91),
    ("sft_zh/alpaca_zh_demo", "sft", 1000, 1000), ("sft_zh/medical_sft", "sft", 1000, 1000),
    ("sft_zh/medical_sharegpt", "sft", None, 1000), ("dpo_en/dpo_en_demo", "dpo", 300, 300),
    ("dpo_en/hh_rlhf_harmless_test", "dpo", 2299, 2312), ("dpo_zh/dpo_zh_demo", "dpo", 300, 300),
    ("dpo_zh/medical_dpo", "dpo", 500, 500)]


@pytest.mark.parametrize("folder,fmt,ok,total", REAL_CHAT)
def test_real_chat_files_convert(shared_data, folder, fmt, ok, total):
    c = dp.config(input=os.path.join(shared_data, folder))
    files, _ = readers.expand_inputs(c["input"], c["exclude"])
    good = bad = 0
    for rec, path, line in readers.iter_records(files, c, readers.Issues(False), {}):
        try:
            msgs = chat_data.to_conversation(rec) if fmt == "sft" else chat_data.to_preference(rec)[0]
            assert msgs[-1]["role"] == ("assistant" if fmt == "sft" else "user")
            good += 1
        except ValueError:
            bad += 1
    assert good + bad == total and (ok is None and 0 < bad < 10 or good == ok)


def test_sft_mask_covers_exactly_the_assistant_replies(tmp_path):
    recs = [{"messages": conv(("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                              ("assistant", "a2 中文"))},
            {"instruction": "x" * 50, "input": "", "output": "y" * 50},  # truncated, reply partly kept
            {"instruction": "z" * 200, "input": "", "output": "w"}]  # truncated before its reply: dropped
    recs += [{"instruction": f"q{i}", "input": "", "output": f"answer {i}"} for i in range(20)]
    path = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    tok = CharTokenizer()
    meta = dp.run(cfg(tmp_path, input=path, format="sft", max_len=100), tok=tok)
    assert meta["counts"]["truncated"] == 2 and meta["counts"]["dropped_lost_all_supervised_tokens"] == 1
    records = data.load_sft(str(tmp_path / "out"), "train")
    ids, labels = records[0]
    assert tok.decode(ids) == tok.apply_chat_template(chat_data.to_conversation(recs[0]), add_generation_prompt=False)
    trained = np.flatnonzero(labels != -100)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    assert [tok.decode(ids[r]) for r in runs] == [f"a1{IM_END}\n", f"a2 中文{IM_END}\n"]
    assert np.array_equal(labels[trained], ids[trained])
    ids, labels = data.load_sft(str(tmp_path / "out"), "val")[0]  # the greedy split sends record 1 to val
    assert len(ids) == 100 and tok.decode(ids[labels != -100]) == "y" * (100 - len(tok.encode(
        tok.apply_chat_template(conv(("user", "x" * 50))))))
    assert len(records) + meta["val_records"] == 22


def test_dpo_layout_and_truncation(tmp_path):
    recs = [{"prompt": f"question {i}", "chosen": f"right {i}", "rejected": f"wrong {i}!"} for i in range(10)]
    recs.append({"prompt": "p" * 300, "chosen": "c" * 300, "rejected": "r" * 10})
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in recs))
    tok = CharTokenizer()
    meta = dp.run(cfg(tmp_path, input=path, format="dpo", max_len=200), tok=tok)
    train, val = (data.load_dpo(str(tmp_path / "out"), s) for s in ("train", "val"))
    assert len(train) + len(val) == 11 and meta["counts"]["truncated"] == 1 and len(val) >= 1
    p, c, r = train[0]
    assert tok.decode(p) == f"{IM_START}user\nquestion 0{IM_END}\n{IM_START}assistant\n"
    assert tok.decode(c) == f"right 0{IM_END}\n" and tok.decode(r) == f"wrong 0!{IM_END}\n"
    p, c, r = train[len(train) - 1]
    assert len(p) == 100 and len(p) + len(c) == 200 and tok.decode(r) == "r" * 10 + f"{IM_END}\n"


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_chat_template_is_a_clear_error(tmp_path, workers):
    class NotPrefixStable(CharTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return f"{len(messages)} " + super().apply_chat_template(messages, add_generation_prompt)

    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"})
                                                 for i in range(5)))
    for fmt in ("sft", "dpo"):
        recs = path if fmt == "dpo" else write(tmp_path / "s.jsonl", json.dumps({"instruction": "q", "output": "a"}))
        with pytest.raises(SystemExit, match="chat template does not render"):
            dp.run(cfg(tmp_path, input=recs, format=fmt, num_workers=workers), tok=NotPrefixStable())
        assert not list((tmp_path / "out").glob("*.bin*"))


# ---------------------------------------------------------------------------------------- the embedded default

def test_default_documents_and_instruction_sets_are_deterministic():
    docs = dp.default_documents()
    assert docs == dp.default_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000
    assert any(d.startswith('The "assert" statement') for d in docs) and any(d.startswith("json.dumps") for d in docs)
    sft, dpo = dp.default_sft_records(), dp.default_dpo_records()
    assert sft == dp.default_sft_records() and len(sft) == len(dpo) > 300
    val = [r for r in sft if r["split"] == "val"]
    assert 0.05 < len(val) / len(sft) < 0.2
    assert [r["messages"][0]["content"] for r in val] == [r["prompt"] for r in dpo if r["split"] == "val"]
    assert all(r["chosen"] != r["rejected"] for r in dpo)
    for r in sft[:50]:
        chat_data.to_conversation(r)
    dumps = next(r for r in sft if "`json.dumps`" in r["messages"][0]["content"])
    assert dumps["messages"][1]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``")


# ------------------------------------------------------------------------------------ with the real tokenizer

@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small sentencepiece BPE trained by train_tokenizer.py (skips if that script is not there yet)."""
    if not os.path.exists(os.path.join(ROOT, "train_tokenizer.py")):
        pytest.skip("train_tokenizer.py is absent")
    tmp = tmp_path_factory.mktemp("bpe")
    text = "\n".join(f"The quick brown fox {i} jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" for i in range(300))
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "train_tokenizer.py", f"--input={tmp / 'corpus.txt'}", "--vocab_size=400",
                    f"--out_dir={tmp / 'tok'}"], cwd=ROOT, check=True, capture_output=True)
    return str(tmp / "tok")


def test_cli_with_real_tokenizer(tmp_path, bpe):
    from tokenizer import Tokenizer
    docs = [f"第{i}篇文档, 内容是 number {i}!!" + " more text" * (i % 5) for i in range(30)]
    path = write(tmp_path / "d.jsonl.gz", "\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), True)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "data_process.py", f"--input={path}", f"--tokenizer={bpe}", f"--out_dir={out}",
                    "--num_workers=2", "--near_dedup=False"], cwd=ROOT, check=True, capture_output=True)
    tok = Tokenizer.from_pretrained(str(out))
    meta, train = read_bin(str(out), "train")
    assert meta["tokenizer_sha256"] == tok.checksum() == Tokenizer.from_pretrained(bpe).checksum()
    _, val = read_bin(str(out), "val")
    got = sorted(tok.decode(d) for d in split_docs(np.concatenate([train, val]), tok.eos_id))
    cleaned = sorted(clean.clean_text(d, dp.config(), __import__("collections").Counter()) for d in docs)
    assert got == cleaned and "第0篇文档，内容是 number 0!" in got


def test_sft_and_dpo_with_real_tokenizer(tmp_path, bpe):
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(bpe)
    recs = [{"conversations": [{"from": "human", "value": f"Q {i} 狐狸?"}, {"from": "gpt", "value": f"A {i} 狗。"}],
             "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    path = write(tmp_path / "r.json", json.dumps(recs, ensure_ascii=False))
    dp.run(cfg(tmp_path, input=path, format="sft", tokenizer=bpe, out_dir=str(tmp_path / "sft")))
    ids, labels = data.load_sft(str(tmp_path / "sft"), "train")[0]
    assert tok.decode(ids) == f"{IM_START}user\nQ 0 狐狸?{IM_END}\n{IM_START}assistant\nA 0 狗。{IM_END}\n"
    assert tok.decode(ids[labels != -100]) == f"A 0 狗。{IM_END}\n"
    recs = [{"prompt": r["conversations"][0]["value"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in recs]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    dp.run(cfg(tmp_path, input=path, format="dpo", tokenizer=bpe, out_dir=str(tmp_path / "dpo")))
    p, c, r = data.load_dpo(str(tmp_path / "dpo"), "train")[0]
    assert tok.decode(np.concatenate([p, c])) == tok.apply_chat_template(
        conv(("user", "Q 0 狐狸?"), ("assistant", "good 0")), add_generation_prompt=False)
    assert tok.decode(r) == f"bad 0{IM_END}\n"


PEAK_RSS = """import resource, sys
import data_process as dp
dp.run(dp.config(input=sys.argv[1], tokenizer=sys.argv[2], out_dir=sys.argv[3], num_workers=1, val_fraction=0.0))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))"""


def test_one_very_long_line_needs_a_few_times_its_size(tmp_path, bpe):
    """Peak RSS grows with a one-line document by less than 15x its size (it was ~40x: sentencepiece's BPE over the
    whole string, and a Python int per token). A 4 MB line against a 2 MB one, so fixed costs cancel out."""
    pytest.importorskip("resource")
    rng = random.Random(0)
    words = ["quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "number", "敏捷的", "狐狸", "12345"]
    runs = []
    for n_words in (350_000, 700_000):
        line = " ".join(rng.choice(words) for _ in range(n_words))
        path = write(tmp_path / f"{n_words}.txt", line + "\n")
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, path, bpe, str(tmp_path / "out")], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        runs.append((len(line.encode("utf-8")), int(out.split()[-1])))
    (size_a, rss_a), (size_b, rss_b) = runs
    assert (rss_b - rss_a) / (size_b - size_a) < 15, runs


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(bpe, monkeypatch):
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(bpe)
    rng = random.Random(1)
    words = ["The", "quick", "brown", "fox", "  jumps", "\tover", "lazy\n", "dog.", "敏捷的棕色狐狸", "12345", "😀"]
    texts = ["".join(rng.choice(words) + " " * rng.randint(0, 2) for _ in range(n)) for n in (30, 900, 5, 2000)]
    texts.append("狐狸" * 700)  # no space at all: cut only past LONG_DOC
    monkeypatch.setattr(dp, "LONG_DOC", 1000)
    monkeypatch.setattr(dp, "PIECE", 64)
    assert len(list(dp._pieces(texts[3]))) > 20 and len(list(dp._pieces(texts[4]))) == 2
    flat, lens = dp._encode(tok, texts[:4], bos=True)
    want = tok.encode_batch(texts[:4], bos=True, eos=True)
    assert lens.tolist() == [len(w) for w in want] and flat.tolist() == sum(want, [])
