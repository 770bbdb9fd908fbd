"""rag.py: chunks that reassemble their document, an index that mirrors its files and refuses what does not belong
to it, Chinese cut into words, prompts that never pass the context, the re-ranker's and the answer's
log-probabilities against a plain forward pass, the retrieval metrics, chat.py --rag and the command line."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import chat
import inference
import rag
from conftest import ROOT, char_tokenizer_folder
from tokenizer import Tokenizer

SETTINGS = {"chunk_tokens": 24, "overlap_tokens": 6, "text_field": "text", "txt_split": "file", "encoding": "utf-8"}
ENGLISH = ("The for statement iterates over the items of any sequence.\n\n\tIndented line;  two  spaces, and a "
           "very long word: https://example.org/" + "x" * 150 + " then more words.\nA class is a template. ") * 3
CHINESE = ("自然语言处理是人工智能领域的一个重要方向。它研究能实现人与计算机之间用自然语言进行有效通信的"
           "各种理论和方法。北京是中国的首都，上海是中国最大的城市。") * 3
MIXED = "用Python的jieba库做中文分词 😀😀😀😀😀😀😀😀😀😀 then English again.\n" * 4


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A real byte-level BPE tokenizer (any text, Chinese and emoji as bytes), trained here on the test texts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([ENGLISH, CHINESE, MIXED], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("bpe")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return Tokenizer.from_pretrained(str(folder))


def reassemble(chunks):
    """A document from its chunks in order: each chunk minus the part the previous one already covered."""
    text, end = "", 0
    for c in chunks:
        assert c["start"] <= end, "a gap between chunks"
        text += c["text"][end - c["start"]:]
        end = c["end"]
    return text


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, MIXED])
def test_chunks_minus_overlaps_reassemble_the_document(bpe, text):
    spans = rag.chunk_spans(text, bpe, 24, 6)
    chunks = [{"start": s, "end": e, "text": text[s:e]} for s, e in spans]
    assert reassemble(chunks) == text and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(len(bpe.encode(c["text"])) <= 24 for c in chunks)  # counted by the tokenizer itself
    assert all(a[0] < b[0] < a[1] for a, b in zip(spans, spans[1:])), "consecutive chunks overlap, and move on"
    assert all(len(bpe.encode(text[b[0]:a[1]])) <= 6 + 2 for a, b in zip(spans, spans[1:]))


def test_chunks_end_after_a_sentence_when_one_is_near(bpe):
    text = "Cats sit here. Dogs run. " * 20
    assert all(text[s:e].rstrip().endswith(".") for s, e in rag.chunk_spans(text, bpe, 24, 6)[:-1])


def test_chinese_is_cut_into_words():
    import jieba
    words = rag.terms("自然语言处理是人工智能领域的一个重要方向")
    assert "人工智能" in words and "自然语言" in words  # words, not characters, not the whole line
    assert all(w in jieba.lcut("自然语言处理是人工智能领域的一个重要方向") for w in words)
    assert {"python", "jieba", "分词"} <= set(rag.terms("用Python的jieba库做中文分词"))


def write_docs(folder, docs):
    folder.mkdir(exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")


def test_chinese_question_finds_its_passage(tmp_path, bpe):
    write_docs(tmp_path / "docs", {"a.txt": "北京是中国的首都，有很多名胜古迹。",
                                   "b.txt": "上海是中国最大的城市，也是金融中心。", "c.txt": "广州的早茶非常有名。"})
    rag.build_index(str(tmp_path / "idx"), str(tmp_path / "docs"), bpe, SETTINGS)
    hits = rag.Index.open(str(tmp_path / "idx")).search("中国的首都是哪里？", 3)
    assert hits[0][0]["source"].endswith("a.txt")


def index_bytes(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs}


def test_reindexing_is_idempotent_and_mirrors_the_files(tmp_path, bpe, capsys):
    docs, idx = tmp_path / "docs", str(tmp_path / "idx")
    write_docs(docs, {"a.txt": ENGLISH, "b.txt": CHINESE, "c.jsonl": json.dumps({"text": MIXED}) + "\n",
                      "image.png": "not text"})
    first = rag.build_index(idx, str(docs), bpe, SETTINGS)
    assert len(first["chunked"]) == 3 and first["chunks"] > 20
    err = capsys.readouterr().err
    assert "skipped 1 file(s)" in err and "image.png" in err  # said, not silently passed over
    before = index_bytes(idx)
    again = rag.build_index(idx, str(docs), bpe, SETTINGS)
    assert again["chunked"] == [] and len(again["kept"]) == 3 and index_bytes(idx) == before
    for name, text in [("a.txt", ENGLISH), ("b.txt", CHINESE), ("c.jsonl", MIXED)]:
        assert reassemble([c for c in rag.Index.open(idx).chunks if c["source"].endswith(name)]) == text

    (docs / "b.txt").write_text("广州的早茶非常有名。", encoding="utf-8")
    os.remove(docs / "c.jsonl")
    report = rag.build_index(idx, str(docs), bpe, SETTINGS)
    assert [os.path.basename(p) for p in report["chunked"]] == ["b.txt"]
    assert [os.path.basename(p) for p in report["dropped"]] == ["c.jsonl"]
    chunks = rag.Index.open(idx).chunks
    assert not any(c["source"].endswith("c.jsonl") or "自然语言" in c["text"] for c in chunks)
    assert [c["text"] for c in chunks if c["source"].endswith("b.txt")] == ["广州的早茶非常有名。"]
    rag.build_index(str(tmp_path / "fresh"), str(docs), bpe, SETTINGS)  # the same files indexed from scratch
    assert index_bytes(idx)["chunks.jsonl"] == index_bytes(str(tmp_path / "fresh"))["chunks.jsonl"]
    assert rag.Index.open(idx).search("早茶", 1)[0][0]["source"].endswith("b.txt")  # BM25 rebuilt too


def test_binary_files_are_skipped_and_named_never_indexed(tmp_path, bpe, capsys):
    pdf = b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n4 0 obj\n<< /Filter /FlateDecode >>\nstream\nx\x9c\xf3H\xcd\xc9\xc9\x07\n"
    write_docs(tmp_path / "docs", {"a.txt": ENGLISH, "b.txt": CHINESE})
    (tmp_path / "docs" / "scan.txt").write_bytes(pdf)  # a PDF under a text name, found in the folder
    (tmp_path / "report.pdf").write_bytes(pdf)  # and one named on the command line
    report = rag.build_index(str(tmp_path / "idx"), f"{tmp_path / 'docs'},{tmp_path / 'report.pdf'}", bpe, SETTINGS)
    assert [os.path.basename(p) for p in report["chunked"]] == ["a.txt", "b.txt"]
    assert {os.path.basename(c["source"]) for c in rag.Index.open(str(tmp_path / "idx")).chunks} == {"a.txt", "b.txt"}
    err = capsys.readouterr().err
    assert "skipped 2 file(s): 2 binary (not text: never read): " in err and "scan.txt" in err and "report.pdf" in err


def test_counts_out_of_range_are_refused_naming_the_key(monkeypatch):
    for key in ("top_k", "rerank", "max_questions", "max_new_tokens", "no_repeat_ngram_size", "index"):
        monkeypatch.setattr(rag, key, getattr(rag, key))  # main() sets them: put back after the test
    for key, value, accepted in [("top_k", 0, "1 or more"), ("top_k", -2, "1 or more"),
                                 ("rerank", -1, r"0 \(BM25 order\) or more"), ("max_questions", -5, r"0 \(all\)"),
                                 ("max_new_tokens", 0, "1 or more"), ("no_repeat_ngram_size", -1, r"0 \(off\)")]:
        good = {"top_k": 1, "rerank": 0, "max_questions": 0, "max_new_tokens": 1,
                "no_repeat_ngram_size": 0}  # the lowest accepted
        args = [f"--{k}={value if k == key else v}" for k, v in good.items()]
        with pytest.raises(SystemExit, match=f"--{key}={value}: must be {accepted}"):
            rag.main(["ask", *args, "--index=no/such/index"])
    with pytest.raises(SystemExit, match="--ckpt=PATH .* are required"):  # they pass
        rag.main(["ask", *[f"--{k}={v}" for k, v in good.items()]])


def test_a_mismatched_or_damaged_index_is_refused(tmp_path, bpe):
    docs, idx = tmp_path / "docs", str(tmp_path / "idx")
    write_docs(docs, {"a.txt": ENGLISH})
    rag.build_index(idx, str(docs), bpe, SETTINGS)
    other = char_tokenizer_folder(str(tmp_path / "chars"))
    with pytest.raises(SystemExit, match="another tokenizer"):
        rag.Index.open(idx, other)
    with pytest.raises(SystemExit, match="chunk_tokens=24 \\(now 32\\)"):
        rag.build_index(idx, str(docs), bpe, {**SETTINGS, "chunk_tokens": 32})
    with pytest.raises(SystemExit, match="not a rag.py index"):
        rag.Index.open(str(docs))

    def damaged(path, how):
        how(path)
        with pytest.raises(rag.DamagedIndex, match="damaged|does not match|changed since"):
            rag.Index.open(idx, bpe)
        assert rag.build_index(idx, str(docs), bpe, SETTINGS)["chunked"]  # indexing again repairs it
        assert reassemble(rag.Index.open(idx, bpe).chunks) == ENGLISH

    chunks_file = os.path.join(idx, "chunks.jsonl")
    damaged(chunks_file, lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2))
    damaged(os.path.join(idx, "index.json"), lambda p: open(p, "w").write("{not json"))
    bm25_file = os.path.join(idx, "bm25", "vocab.index.json")
    damaged(bm25_file, lambda p: open(p, "w").write("[]"))
    damaged(bm25_file, os.remove)


def test_the_prompt_never_exceeds_the_budget(ckpt_folder):
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    budget = 100
    for q_len in (5, 30, 60):
        for sizes in ([10], [200], [30, 30, 30], [5, 300, 5]):
            question = "why " * (q_len // 4) + "?"
            chunks = [{"text": "abc def. " * (n // 9 + 1)} for n in sizes]
            messages, used = rag.rag_messages(tok, question, chunks, budget)
            prompt = inference.render_chat(tok, messages)
            assert len(tok.encode(prompt)) <= budget and question in prompt
            texts = rag.fit_context(tok, question, [c["text"] for c in chunks], budget)
            assert all(t == c["text"] for t, c in zip(texts[:-1], chunks))  # whole, but for the last
            assert not texts or chunks[len(texts) - 1]["text"].startswith(texts[-1])
    with pytest.raises(ValueError, match="question takes"):
        rag.rag_messages(tok, "why " * 40, chunks, budget)
    history = [{"role": "user", "content": "hi " * 10}, {"role": "assistant", "content": "ok " * 10}] * 3
    messages, _ = rag.rag_messages(tok, "why?", [{"text": "abc " * 5}], 200, history=history)
    assert len(tok.encode(inference.render_chat(tok, messages))) <= 200 and 1 < len(messages) < 7  # oldest dropped


def reference_logprob(model, prefix_ids, target_ids):
    """log p(target | prefix) from one unpadded forward pass and log_softmax, token by token."""
    ids = torch.tensor([prefix_ids + target_ids])
    logits, _ = model(ids)
    logp = torch.log_softmax(logits[0].float(), -1)
    return sum(logp[len(prefix_ids) - 1 + t, target_ids[t]].item() for t in range(len(target_ids)))


def test_rerank_and_answer_scores_match_a_plain_forward_pass(ckpt_folder):
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    hits = [({"text": t}, 0.0) for t in ("the cat sat.", "a passage about dogs and cats.", "x")]
    question = "where did the cat sit?"
    ranked = rag.rerank_hits(model, tok, question, hits)
    ask = tok.encode("\nPlease write a question based on this passage.\nQuestion:")
    q = tok.encode(" " + question)
    expected = {c["text"]: reference_logprob(model, tok.encode("Passage: " + c["text"]) + ask, q) for c, _ in hits}
    assert [c["text"] for c, _ in ranked] == sorted(expected, key=expected.get, reverse=True)
    assert all(abs(s - expected[c["text"]]) < 1e-3 for c, s in ranked)
    long_passage = rag.rerank_hits(model, tok, question, [({"text": "dogs " * 100}, 0.0)])  # cut to the context
    assert torch.isfinite(torch.tensor(long_passage[0][1]))
    prompts, answer = ["hello", "a longer prompt here"], "the answer."
    got = rag.answer_nll(model, tok, prompts, answer)
    a = tok.encode(answer)
    assert got == pytest.approx([-reference_logprob(model, tok.encode(p), a) / len(a) for p in prompts], abs=1e-4)


def test_eval_metrics_by_hand(tmp_path, bpe):
    write_docs(tmp_path / "docs", {"gold1.txt": "apple cherry", "distractor.txt": "apple banana banana",
                                   "gold2.txt": "kiwi melon", "other.txt": "grape lemon"})
    idx = str(tmp_path / "idx")
    rag.build_index(idx, str(tmp_path / "docs"), bpe, SETTINGS)
    d = str(tmp_path / "docs")
    qs = [{"question": "kiwi", "answer": "x", "source": os.path.join(d, ".", "gold2.txt")},     # rank 1
          {"question": "apple banana", "answer": "x", "source": os.path.join(d, "gold1.txt") + ":1"},  # rank 2
          {"question": "grape", "answer": "x", "source": os.path.join(d, "gold1.txt")}]         # not found
    result = rag.evaluate(rag.Index.open(idx), qs)
    assert result["bm25/recall@1"] == pytest.approx(1 / 3) and result["bm25/recall@5"] == pytest.approx(2 / 3)
    assert result["bm25/mrr@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    bad = tmp_path / "qs.jsonl"
    bad.write_text(json.dumps(qs[0]) + "\n" + json.dumps({"question": "kiwi", "answer": "x"}) + "\n")
    with pytest.raises(SystemExit, match="qs.jsonl:2: no source"):
        rag.load_questions(str(bad))


def test_default_questions_point_at_documents_that_hold_their_answers():
    import default_data
    docs, qs = default_data.default_documents(), rag.default_questions()
    assert len(qs) > 0.9 * len(default_data.default_sft_records())
    for q in qs[::50]:
        n = int(q["source"][0].rsplit(":", 1)[1])
        assert q["answer"] in " ".join(docs[n - 1].split())


def test_chat_with_rag_gives_passages_and_sources(ckpt_folder, tmp_path):
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    write_docs(tmp_path / "docs", {"cats.txt": "cat on the mat.", "dogs.txt": "dog in a park."})
    rag.build_index(str(tmp_path / "idx"), str(tmp_path / "docs"), tok, SETTINGS)
    index = rag.Index.open(str(tmp_path / "idx"), tok)
    inputs, prompts, shown = iter(["cat?", "and dog?", "/exit"]), [], []
    real = inference.stream_reply

    def spy(model, tok, prompt, *args, **kw):
        prompts.append(prompt)
        return real(model, tok, prompt, *args, **kw)

    inference.stream_reply, chat.inference.stream_reply = spy, spy
    try:
        history = chat.repl(model, tok, max_new_tokens=8, temperature=0.0, read=lambda _: next(inputs),
                            write=shown.append, index=index, rag_top_k=1, rag_rerank=2)
    finally:
        inference.stream_reply = chat.inference.stream_reply = real
    assert "cat on the mat." in prompts[0] and "dog in a park." in prompts[1]
    assert all(len(tok.encode(p)) <= model.config.max_seq_len - 8 for p in prompts)
    assert "cats.txt:1 [0:15]" in "".join(shown) and "dogs.txt:1" in "".join(shown)
    assert [m["content"] for m in history if m["role"] == "user"][-1] == "and dog?"
    assert all("Context" not in m["content"] for m in history)


def test_command_line_index_ask_eval(ckpt_folder, tmp_path):
    write_docs(tmp_path / "docs", {"cats.txt": "the cat sat on the mat.", "dogs.txt": "the dog ran in the park."})
    qs = tmp_path / "qs.jsonl"
    cats = str(tmp_path / "docs" / "cats.txt")
    qs.write_text(json.dumps({"question": "where did the cat sit?", "answer": "on the mat.", "source": cats}) + "\n"
                  + json.dumps({"question": "cat?", "answer": "mat " * 40, "source": cats}) + "\n")  # too long
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "rag.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    idx = f"--index={tmp_path / 'idx'}"
    r = run("index", f"--docs={tmp_path / 'docs'}", f"--tokenizer={ckpt_folder}", idx, "--chunk_tokens=32",
            "--overlap_tokens=4")
    assert r.returncode == 0 and "2 chunks; 2 file(s) chunked" in r.stdout, r.stderr
    r = run("ask", idx, f"--ckpt={ckpt_folder}", "--question=where did the cat sit?", "--max_new_tokens=8",
            "--dtype=float32", "--rerank=2")
    assert r.returncode == 0 and "Sources:\n[1] " in r.stdout and "cats.txt:1 [0:23]" in r.stdout, r.stderr
    r = run("eval", idx, f"--ckpt={ckpt_folder}", f"--questions={qs}", "--dtype=float32", "--rerank=2",
            f"--out={tmp_path / 'e.json'}")
    result = json.load(open(tmp_path / "e.json"))
    assert r.returncode == 0 and result["bm25/recall@1"] == 1.0 and "nll/gold" in result, r.stderr
    assert result["questions"] == 2 and result["nll_questions"] == 1  # the answer that cannot fit is counted out
    r = run("search", idx)
    assert r.returncode != 0 and "usage: python rag.py index|ask|eval" in r.stderr


def reply_repeats_an_ngram(prompt_ids, reply_ids, n):
    """Whether an n-gram ending in the reply occurs earlier in prompt + reply (what no_repeat_ngram_size bans)."""
    ids = prompt_ids + reply_ids
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return any(grams[i] in grams[:i] for i in range(max(0, len(prompt_ids) - n + 1), len(grams)))


def test_ask_decodes_with_no_repeat_ngram_size_and_says_when_the_answer_is_empty(ckpt_folder, tmp_path, monkeypatch,
                                                                                capsys):
    for key in ("index", "ckpt", "question", "top_k", "max_new_tokens", "no_repeat_ngram_size", "dtype"):
        monkeypatch.setattr(rag, key, getattr(rag, key))  # main() sets them: put back after the test
    write_docs(tmp_path / "docs", {"cats.txt": "cat on the mat."})
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    rag.build_index(str(tmp_path / "idx"), str(tmp_path / "docs"), tok, SETTINGS)
    args = ["ask", f"--index={tmp_path / 'idx'}", f"--ckpt={ckpt_folder}", "--question=cat?", "--top_k=1",
            "--max_new_tokens=16", "--dtype=float32"]
    messages, _ = rag.rag_messages(tok, "cat?", [{"text": "cat on the mat."}], 128 - 16)
    prompt = inference.render_chat(tok, messages)
    assert "cat on the mat." in prompt
    capsys.readouterr()
    for n in (0, 3):  # the reply printed is the one generation path's reply with the same settings
        rag.main(args + [f"--no_repeat_ngram_size={n}"])
        reply = inference.stream_reply(model, tok, prompt, 16, 0.0, no_repeat_ngram_size=n)
        assert capsys.readouterr().out == reply + "\n\nSources:\n[1] " + rag.where(rag.Index.open(
            str(tmp_path / "idx")).chunks[0]) + "\n"
        assert reply_repeats_an_ngram(tok.encode(prompt), tok.encode(reply), 3) == (n == 0)  # loops without
    for reply, said in (("", "ended it at once"), ("\n\n ", "wrote only whitespace")):
        monkeypatch.setattr(inference, "stream_reply", lambda *a, reply=reply, **k: reply)
        rag.main(args)
        assert f"(an empty answer: the model {said})\n\nSources:\n[1] " in capsys.readouterr().out


def test_gap_closed_only_where_the_gold_passages_help_beyond_the_noise(ckpt_folder, tmp_path, monkeypatch):
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    write_docs(tmp_path / "docs", {"a.txt": "cat on the mat.", "b.txt": "dog in a park."})
    rag.build_index(str(tmp_path / "idx"), str(tmp_path / "docs"), tok, SETTINGS)
    index = rag.Index.open(str(tmp_path / "idx"), tok)
    qs = [{"question": "cat?", "answer": "mat.", "source": str(tmp_path / "docs" / "a.txt")}] * 4
    for gold, closed in (([1.5, 1.4, 1.6, 1.5], 0.5),      # gains 0.5 +- 0.04 (one standard error): a real gap
                         ([1.7, 2.3, 1.69, 2.29], None)):  # gains of either sign: mean 0.005 +- 0.17, noise
        nlls = iter([2.0, 1.75, g] for g in gold)  # none, retrieved, gold
        monkeypatch.setattr(rag, "answer_nll", lambda model, tok, prompts, answer: next(nlls))
        result = rag.evaluate(index, qs, model, tok, k=1, rerank_n=0)
        gains = [2.0 - g for g in gold]
        assert result["nll/gold_gain_se"] == pytest.approx(statistics.stdev(gains) / 2)
        assert result["gap_closed"] == (closed and pytest.approx((2.0 - 1.75) / (2.0 - sum(gold) / 4)))
