"""SFT and DPO data under each chat template (data_process.py --template): the trained positions are exactly the
assistant turns and their end tokens, checked against spans rendered here rather than by chat_data; ChatML markers
added to tokenizers that lack them; truncation that reports the records left without supervised tokens."""
import json
import os

import numpy as np
import pytest

import chat_data
import data
import data_process as dp
import readers
from test_tokenizer import bpe_dir, corpus_files, corpus_text, gpt2_like, llama_like  # noqa: F401 (fixtures)
from tokenizer import IM_END, IM_START, Tokenizer

SYSTEM = "You answer briefly."
TURNS = [("What is 2 + 2?", "It is 4."), ("And 3 + 3?", "6, of course.\nSix."), ("中文呢？", "六。")]


def conversation(k):
    msgs = [{"role": "system", "content": SYSTEM}]
    for q, a in TURNS:
        msgs += [{"role": "user", "content": f"{q} ({k})"}, {"role": "assistant", "content": f"{a} ({k})"}]
    return msgs


def write_jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    return str(path)


def make(tmp_path, tokenizer, recs, name="out", **kw):
    out = str(tmp_path / name)
    kw = {"format": "sft", "num_workers": 1, **kw}
    meta = dp.run(dp.config(input=write_jsonl(tmp_path / f"{name}.jsonl", recs), tokenizer=str(tokenizer),
                            out_dir=out, **kw))
    return out, meta


@pytest.fixture
def tokenizer_folder(request, bpe_dir, tmp_path):  # noqa: F811
    """ours: sentencepiece with ChatML markers; gpt2: byte-level BPE whose EOS is its pad token, no markers."""
    if request.param == "ours":
        return bpe_dir
    gpt2_like(tmp_path / "gpt2", corpus_text().split("\n"))
    return tmp_path / "gpt2"


def labelled_runs(ids, labels):
    """The ids of each run of consecutive labelled positions."""
    where = np.flatnonzero(labels != -100)
    return [ids[r].tolist() for r in np.split(where, np.flatnonzero(np.diff(where) > 1) + 1) if len(r)]


@pytest.mark.parametrize("tokenizer_folder", ["ours", "gpt2"], indirect=True)
@pytest.mark.parametrize("template", ["chatml", "qa"])
def test_labels_are_the_assistant_turns_with_their_end_tokens(tmp_path, tokenizer_folder, template):
    recs = [{"messages": conversation(k), "split": "val" if k == 0 else "train"} for k in range(4)]
    out, meta = make(tmp_path, tokenizer_folder, recs, template=template)
    tok = Tokenizer.from_pretrained(out)
    assert meta["train_records"] == 3 and meta["val_records"] == 1
    if template == "qa":
        assert meta["vocab_size"] == Tokenizer.from_pretrained(str(tokenizer_folder)).vocab_size  # nothing added
    eos = tok.decode([tok.eos_id])
    for split, i, k in (("val", 0, 0), ("train", 1, 2)):  # record k = 0 is the val one, pinned by "split"
        ids, labels = data.load_sft(out, split)[i]
        msgs = conversation(k)
        # the whole record and each trained span, rendered here from the template's definition
        if template == "chatml":
            text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
            spans = [tok.encode(m["content"]) + [tok.special_tokens[IM_END]] + tok.encode("\n")
                     for m in msgs if m["role"] == "assistant"]
        else:
            text = f"{SYSTEM}\n" + "".join(f"##Question:\n{q}\n##Answer:\n{a}{eos}" for q, a in
                                           zip(*[[m["content"] for m in msgs if m["role"] == r]
                                                 for r in ("user", "assistant")]))
            spans = [tok.encode(m["content"]) + [tok.eos_id] for m in msgs if m["role"] == "assistant"]
        assert tok.decode(ids) == text
        assert labelled_runs(ids, labels) == spans
        assert np.array_equal(labels[labels != -100], ids[labels != -100])
    if tokenizer_folder.name == "gpt2" and template == "qa":  # EOS is the pad token, and still trained
        assert tok.pad_id == tok.eos_id and (labels == tok.eos_id).sum() == len(TURNS)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chatml_markers_are_added_to_a_tokenizer_without_them(tmp_path, bpe_dir, kind):  # noqa: F811
    base_dir = tmp_path / kind
    if kind == "llama":
        llama_like(Tokenizer.from_pretrained(str(bpe_dir))).save_pretrained(base_dir)
    else:
        gpt2_like(base_dir, corpus_text().split("\n"))
    base = Tokenizer.from_pretrained(str(base_dir))
    recs = [{"messages": conversation(k)} for k in range(10)]
    templates = ["chatml", "auto"] if kind == "gpt2" else ["chatml"]  # gpt2 has no template: auto is ChatML too
    for template in templates:
        out, meta = make(tmp_path, base_dir, recs, name=template, template=template)
        n = base.vocab_size
        assert meta["added_tokens"] == {IM_START: n, IM_END: n + 1} and meta["vocab_size"] == n + 2
        assert meta["base_tokenizer_sha256"] == base.checksum() != meta["tokenizer_sha256"]
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
            assert json.load(f)["added_tokens"] == {IM_START: n, IM_END: n + 1}
        grown = Tokenizer.from_pretrained(out)
        assert grown.checksum() == meta["tokenizer_sha256"] and grown.encode(IM_END) == [n + 1]
        ids, labels = data.load_sft(out, "train")[0]
        assert ids[0] == n and (ids == n + 1).sum() == 1 + 2 * len(TURNS)  # every marker is one new id
        assert labelled_runs(ids, labels)[0][-2:] == [n + 1] + base.encode("\n")
    prefs = [{"prompt": f"Q{k}?", "chosen": "yes", "rejected": "no"} for k in range(10)]
    out, meta = make(tmp_path, base_dir, prefs, name="dpo", format="dpo", template="chatml")
    p, c, r = data.load_dpo(out, "train")[0]
    assert meta["added_tokens"] == {IM_START: n, IM_END: n + 1} and p[0] == n and c[-2] == r[-2] == n + 1
    out, meta = make(tmp_path, bpe_dir, recs, name="has_them", template="chatml")
    assert "added_tokens" not in meta and "base_tokenizer_sha256" not in meta


def test_workers_that_reload_the_tokenizer_get_the_grown_one(tmp_path):
    """Where workers are not forked they load the tokenizer from a folder: it must be the one with the markers."""
    base_dir = tmp_path / "gpt2"
    base = gpt2_like(base_dir, corpus_text().split("\n"))
    recs = [{"messages": conversation(k)} for k in range(130)]  # three batches of records
    results = []
    for workers, source in ((1, base), (2, str(base_dir))):
        cfg = dp.config(format="sft", tokenizer=str(base_dir), out_dir=str(tmp_path / f"w{workers}"),
                        num_workers=workers, template="chatml")
        chat_data.prepare_chat(cfg, base, source, [(r, "r.jsonl", i + 1) for i, r in enumerate(recs)], {},
                               readers.Issues(False))
        results.append(open(tmp_path / f"w{workers}" / "train.bin", "rb").read())
    assert results[0] == results[1]


def test_qa_preference_data(tmp_path, bpe_dir):  # noqa: F811
    recs = [{"prompt": f"Question {k}?", "chosen": f"right {k}", "rejected": f"wrong {k}", "system": SYSTEM}
            for k in range(10)]
    out, _ = make(tmp_path, bpe_dir, recs, format="dpo", template="qa")
    tok = Tokenizer.from_pretrained(out)
    p, c, r = data.load_dpo(out, "train")[0]
    assert tok.decode(p) == f"{SYSTEM}\n##Question:\nQuestion 0?\n##Answer:\n"
    assert c.tolist() == tok.encode("right 0") + [tok.eos_id] and r.tolist() == tok.encode("wrong 0") + [tok.eos_id]


def test_truncation_reports_the_records_that_lost_all_supervised_tokens(tmp_path, bpe_dir, capsys):  # noqa: F811
    recs = [{"instruction": f"q{k}", "output": f"answer {k}"} for k in range(10)]
    recs += [{"instruction": "x" * 300, "output": "never seen"},  # the prompt alone fills max_len
             {"instruction": "short", "output": "y" * 300}]  # the answer is cut, partly kept
    out, meta = make(tmp_path, bpe_dir, recs, max_len=64, val_fraction=0.0)
    assert meta["counts"]["truncated"] == 2 and meta["counts"]["dropped_lost_all_supervised_tokens"] == 1
    assert meta["train_records"] == 11
    assert "max_len=64: 2 record(s) truncated, 1 of them lost all supervised tokens and were dropped" in \
        capsys.readouterr().out


def test_bad_template_settings_are_named(tmp_path, bpe_dir):  # noqa: F811
    recs = [{"messages": conversation(0)}]
    with pytest.raises(SystemExit, match="template must be one of auto, chatml, qa, not 'alpaca'"):
        make(tmp_path, bpe_dir, recs, template="alpaca")
    gpt2_like(tmp_path / "no_eos", corpus_text().split("\n"))
    (tmp_path / "no_eos" / "tokenizer_config.json").write_text("{}")  # names no EOS
    with pytest.raises(SystemExit, match="no_eos: --template=qa ends every answer with EOS, and this tokenizer has no"):
        make(tmp_path, tmp_path / "no_eos", recs, template="qa")


def test_prompt_completion_records_and_renamed_keys(tmp_path, bpe_dir):  # noqa: F811
    msgs = chat_data.to_conversation({"prompt": "Q?", "completion": "A.", "system": SYSTEM})
    assert msgs == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "A."}]
    turns = [{"role": "user", "content": "Q?"}]
    assert chat_data.to_conversation({"prompt": turns, "completion": [{"role": "assistant", "content": "A."}]}) == \
        msgs[1:]
    recs = [{"riddle": f"What has {k} legs?", "answer": f"A thing with {k}."} for k in range(10)]
    with pytest.raises(SystemExit, match="not a chat record.*--rename maps other keys"):
        make(tmp_path, bpe_dir, recs)
    out, meta = make(tmp_path, bpe_dir, recs, rename="riddle:prompt, answer:completion", template="qa")
    tok = Tokenizer.from_pretrained(out)
    ids, labels = data.load_sft(out, "train")[0]
    assert tok.decode(ids) == "##Question:\nWhat has 0 legs?\n##Answer:\nA thing with 0.</s>"
    with pytest.raises(SystemExit, match="rename: expected old:new pairs separated by commas, got 'riddle'"):
        make(tmp_path, bpe_dir, recs, rename="riddle")


def test_real_riddles_render(tmp_path, bpe_dir, shared_data):  # noqa: F811
    path = os.path.join(shared_data, "sft_en", "riddles_nkilm")
    meta = dp.run(dp.config(input=path, tokenizer=str(bpe_dir), out_dir=str(tmp_path / "r"), format="sft",
                            num_workers=1, rename="riddle:prompt,answer:completion"))
    assert meta["train_records"] + meta["val_records"] == 545 and meta["counts"]["skipped_bad_records"] == 0


def test_the_embedded_default_set_renders_with_a_held_out_split(tmp_path, bpe_dir):  # noqa: F811
    """run.sh's SFT stage trains on it and answers a held-out question."""
    meta = dp.run(dp.config(format="sft", tokenizer=str(bpe_dir), out_dir=str(tmp_path / "d"), num_workers=1))
    assert meta["train_records"] > 1000 and meta["val_records"] > 100
    assert meta["counts"]["skipped_bad_records"] == 0 and "truncated" not in meta["counts"]
    tok = Tokenizer.from_pretrained(str(tmp_path / "d"))
    ids, labels = data.load_sft(str(tmp_path / "d"), "val")[0]
    question, answer = next(r["messages"] for r in dp.default_sft_records() if r["split"] == "val")
    assert tok.decode(ids).startswith(f"{IM_START}user\n{question['content']}{IM_END}\n")
    assert tok.decode(ids[labels != -100]) == f"{answer['content']}{IM_END}\n"
