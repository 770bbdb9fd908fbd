"""eval.py and inference.perplexity: scoring against hand-computed values (a stub model whose log-probs we set), the
metric definitions, prompt construction, perplexity against direct computations, batching invariance on a real tiny
Transformer, checkpoint loading (inference.load_model: folder, quantized, adapter) and the command line's refusals."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import convert
import eval as ev
import inference
import readers
from conftest import char_tokenizer_folder, tiny_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2)


class CharTok:
    """Stand-in tokenizer: one id per character of a fixed alphabet (ids 2..), BOS 0, EOS 1."""

    def __init__(self, alphabet=" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.?!\n0123456789"):
        self.alphabet = alphabet
        self.bos_id, self.eos_id = 0, 1
        self.vocab_size = len(alphabet) + 2

    def encode(self, text, bos=False, eos=False):
        return ([0] if bos else []) + [self.alphabet.index(c) + 2 for c in text] + ([1] if eos else [])

    def encode_batch(self, texts, bos=False, eos=False):
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids, skip_special=False):
        return "".join(self.alphabet[i - 2] for i in ids if i >= 2)


class BigramStub(nn.Module):
    """A 'model' whose next-token logits depend only on the current token: logits = table[idx]."""

    def __init__(self, table, max_seq_len=64):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx, targets=None):
        return self.table[idx], None


def unigram_stub(tok, probs):
    """Every position predicts the same distribution: probs {char: p}, the rest of the vocab ~0."""
    logp = torch.full((tok.vocab_size,), -1e9)
    for c, p in probs.items():
        logp[tok.encode(c)[0]] = math.log(p)
    return BigramStub(logp.expand(tok.vocab_size, -1).clone())


# ---------------------------------------------------------------------------------------------- scoring metrics

# p(" ") = 1/4, p(a) = 1/2, p(b) = p(c) = 1/8: in bits, " " costs 2, a 1, b/c 3. Each choice is scored as
# " " + choice:   "a": 3 bits, 2 tokens, 1 char;  "aa": 4 bits, 3 tokens, 2 chars;  "aaaab": 9 bits, 6 tokens, 5 chars
#   summed:    -3, -4, -9      -> "a"      wins acc
#   per token: -1.5, -1.33, -1.5 -> "aa"   wins acc_token
#   per char:  -3, -2, -1.8    -> "aaaab"  wins acc_norm (lm-evaluation-harness's, by len(choice))
PROBS = {" ": 1 / 4, "a": 1 / 2, "b": 1 / 8, "c": 1 / 8}
CHOICES = ["a", "aa", "aaaab"]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_scores_and_metrics_match_hand_computation(batch_size):
    tok = CharTok()
    model = unigram_stub(tok, PROBS)
    items = [ev.MCItem("c", CHOICES, label) for label in range(3)]
    scores = ev.score_items(model, tok, items, batch_size, desc=None)
    for sc in scores:
        assert [n for _, n in sc] == [2, 3, 6]
        assert [s / LN2 for s, _ in sc] == pytest.approx([-3, -4, -9], abs=1e-5)
    metrics, hits = ev.mc_metrics(items, scores)
    assert hits == {"acc": [True, False, False], "acc_token": [False, True, False], "acc_norm": [False, False, True]}
    assert metrics == pytest.approx({"acc": 1 / 3, "acc_token": 1 / 3, "acc_norm": 1 / 3})


def test_choice_is_scored_in_context():
    """A bigram stub: the choice's first token is predicted from the context's last token, and the sep counts."""
    tok = CharTok()
    V = tok.vocab_size
    table = torch.full((V, V), -1e9)
    x, y, sp, a, b = (tok.encode(ch)[0] for ch in "xy ab")
    table[x, sp] = table[y, sp] = 0.0  # the context's last char always goes to " "
    table[sp, a], table[sp, b] = math.log(0.9), math.log(0.1)
    table[a, :] = table[b, :] = 0.0  # anything after the choice: irrelevant
    items = [ev.MCItem("x", ["a", "b"], 0), ev.MCItem("yy", ["b", "a"], 1)]
    scores = ev.score_items(BigramStub(table), tok, items, batch_size=4, desc=None)
    assert [s for s, _ in scores[0]] == pytest.approx([math.log(0.9), math.log(0.1)], abs=1e-5)
    assert [s for s, _ in scores[1]] == pytest.approx([math.log(0.1), math.log(0.9)], abs=1e-5)
    assert ev.mc_metrics(items, scores)[0]["acc"] == 1.0


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    tok = CharTok()
    items = [ev.MCItem("c", ["b", "c"], 1)]
    scores = ev.score_items(unigram_stub(tok, PROBS), tok, items, 1, desc=None)  # b and c cost the same
    assert ev.mc_metrics(items, scores)[0]["acc"] == 0.0 and int(np.argmax([s for s, _ in scores[0]])) == 0


def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    tok = CharTok()
    tokens, n_ctx = ev.encode_pair(tok, "Answer: ", "A")
    assert tok.decode(tokens[:n_ctx]) == "Answer:" and tok.decode(tokens[n_ctx:]) == " A"
    tokens, n_ctx = ev.encode_pair(tok, "", "hi")
    assert tokens == [tok.bos_id] + tok.encode("hi") and n_ctx == 1
    tokens, n_ctx = ev.encode_pair(tok, "q", "a", bos=True)
    assert tokens[0] == tok.bos_id and n_ctx == 2


def test_long_requests_are_cut_on_the_left():
    tok = CharTok()
    model = unigram_stub(tok, PROBS)
    model.config.max_seq_len = 8
    [[(s, n)]] = ev.score_items(model, tok, [ev.MCItem("c" * 50, ["aa"], 0)], 1, desc=None)
    assert n == 3 and s / LN2 == pytest.approx(-4, abs=1e-5)
    with pytest.raises(ValueError, match="more than max_seq_len"):
        ev.score_items(model, tok, [ev.MCItem("c", ["a" * 20], 0)], 1, desc=None)


def test_first_token_method_reads_the_letters_after_the_prompt():
    tok = CharTok()
    V = tok.vocab_size
    table = torch.zeros(V, V)
    ids = {ch: tok.encode(ch)[0] for ch in "ABCDxy"}
    table[ids["x"], ids["C"]] = 5.0  # after "x" the model says C
    table[ids["y"], ids["A"]] = 5.0  # after "y" it says A
    table[ids["y"], ids["B"]] = 4.0
    items = [ev.MCItem("question x", list("ABCD"), 2, ""), ev.MCItem("y", list("ABCD"), 1, "")]
    logits = ev.first_token_logits(BigramStub(table), tok, items, batch_size=2, desc=None)
    assert logits == [[0, 0, 5, 0], [5, 4, 0, 0]]
    results = ev.run_mc(BigramStub(table), tok, items, "ceval", method="first_token", batch=2)
    assert results["all"] == {"n": 2, "acc": 0.5}


# ---------------------------------------------------------------------------------------------- real tiny model

def test_batching_does_not_change_scores():
    tok = CharTok()
    model = tiny_transformer(tok.vocab_size)
    rng = np.random.default_rng(0)
    words = ["the cat", "a dog", "sat on it", "ran", "quietly home", "x"]
    items = [ev.MCItem(" ".join(rng.choice(words, rng.integers(1, 6))), list(rng.choice(words, 4, replace=False)),
                       int(rng.integers(0, 4))) for _ in range(12)]
    one = ev.score_items(model, tok, items, batch_size=1, desc=None)
    many = ev.score_items(model, tok, items, batch_size=7, desc=None)
    for a, b in zip(one, many):
        assert [n for _, n in a] == [n for _, n in b]
        assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=1e-4)
    # and the batched score is the log-prob the model assigns when run on that sequence alone
    tokens, n_ctx = ev.encode_pair(tok, items[0].context, " " + items[0].choices[0])
    logits, _ = model(torch.tensor([tokens[:-1]]))
    ref = torch.log_softmax(logits[0].double(), -1)[torch.arange(n_ctx - 1, len(tokens) - 1), tokens[n_ctx:]].sum()
    assert many[0][0][0] == pytest.approx(ref.item(), abs=1e-4)


def test_one_token_choices_share_one_forward_pass():
    """MMLU/C-Eval letters: the four continuations of a context are one row; each score is still the direct one."""
    tok = CharTok()
    model = tiny_transformer(tok.vocab_size)
    items = [ev.MCItem(q + "\nAnswer:", list("ABCD"), 0, sep="") for q in ("What is up?", "Why not", "x")]
    rows_seen = []
    real_forward = model.forward
    model.forward = lambda idx, *a, **kw: rows_seen.append(idx.shape[0]) or real_forward(idx, *a, **kw)
    scores = ev.score_items(model, tok, items, batch_size=16, desc=None)
    assert rows_seen == [3]
    for it, sc in zip(items, scores):
        ids = tok.encode(it.context)
        logp = torch.log_softmax(real_forward(torch.tensor([ids]))[0][0, -1].double(), -1)
        assert [s for s, _ in sc] == pytest.approx([logp[tok.encode(c)[0]].item() for c in "ABCD"], abs=1e-4)
        assert [n for _, n in sc] == [1, 1, 1, 1]


def test_ppl_is_exp_of_the_models_mean_loss():
    model = tiny_transformer(50, max_seq_len=64)
    tokens = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    _, loss = model(tokens[None, :-1], tokens[None, 1:])
    for stride in (1, 7, 39):  # the window covers the text: one window whatever the stride
        r = inference.perplexity(model, tokens, block_size=39, stride=stride)
        assert r["tokens"] == 39
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert inference.perplexity(model, tokens, block_size=64)["loss"] == pytest.approx(loss.item(), rel=1e-5)


def _token_nll(model, tokens, t, context):
    """-log p(tokens[t] | the `context` tokens before it), by one direct forward pass."""
    logits, _ = model(tokens[None, t - context:t])
    return -torch.log_softmax(logits[0, -1].double(), -1)[tokens[t]].item()


@pytest.mark.parametrize("block, stride", [(8, 1), (8, 3), (8, 8), (10, 4)])
def test_sliding_window_scores_every_token_once_with_the_carried_context(block, stride):
    """Reference: window k starts at k*stride; token t is scored by the first window that reaches it, with the
    tokens from that window's start as context -- computed token by token here."""
    model = tiny_transformer(30, max_seq_len=16)
    tokens = torch.randint(0, 30, (27,), generator=torch.Generator().manual_seed(2))
    n, nll = len(tokens), []
    for t in range(1, n):
        start = 0
        while start + block < t:  # the first window (inputs tokens[start:start+block]) whose targets reach t
            start += stride
        nll.append(_token_nll(model, tokens, t, t - start))
    for batch_size in (1, 3):
        r = inference.perplexity(model, tokens, block_size=block, stride=stride, batch_size=batch_size)
        assert r["tokens"] == n - 1
        assert r["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_perplexity_takes_a_memmapped_stream():
    """data.token_stream hands over a read-only uint16 memmap; --limit keeps the first tokens."""
    tokens = np.random.default_rng(3).integers(0, 30, 200).astype(np.uint16)
    model = tiny_transformer(30)
    direct = inference.perplexity(model, torch.tensor(tokens[:50].astype(np.int64)), 16, 8)
    readonly = tokens.view()
    readonly.flags.writeable = False
    assert inference.perplexity(model, readonly[:50], 16, 8) == pytest.approx(direct)


def test_perplexity_rejects_bad_windows():
    model = tiny_transformer(30)
    with pytest.raises(ValueError, match="stride"):
        inference.perplexity(model, torch.arange(10), block_size=4, stride=5)
    with pytest.raises(ValueError, match="at least 2"):
        inference.perplexity(model, torch.arange(1), block_size=4)


# ---------------------------------------------------------------------------------------------- data and prompts

def write_csv(path, rows):
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def test_ceval_k_shot_prompt(tmp_path):
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(tmp_path / "dev/logic_dev.csv", [head, [0, "一加一____", "1", "2", "3", "4", "B", "解释"],
                                              [1, "二加二____", "4", "5", "6", "7", "A", ""],
                                              [2, "不用的____", "x", "y", "z", "w", "C", ""]])
    write_csv(tmp_path / "val/logic_val.csv", [head[:-1], [0, "三加三____", "5", "6", "7", "8", "B"]])
    write_csv(tmp_path / "val/law_val.csv", [head[:-1], [0, "问____", "a", "b", "c", "d", "D"]])
    [item] = ev.load_letter_task("ceval", str(tmp_path), subjects="logic", shots=2, sep="")
    assert item.context == ("以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n"
                            "一加一____\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
                            "二加二____\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n"
                            "三加三____\nA. 5\nB. 6\nC. 7\nD. 8\n答案：")
    assert (item.choices, item.label, item.sep, item.subject) == (list("ABCD"), 1, "", "logic")
    loglik = ev.load_letter_task("ceval", str(tmp_path), subjects="logic", shots=1, sep=" ")[0]
    assert "答案： B\n\n三加三" in loglik.context and loglik.sep == " "
    assert [it.subject for it in ev.load_letter_task("ceval", str(tmp_path))] == ["law", "logic"]
    with pytest.raises(SystemExit, match="unknown subject"):
        ev.load_letter_task("ceval", str(tmp_path), subjects="physics")
    with pytest.raises(SystemExit, match="needs 4 answered"):
        ev.load_letter_task("ceval", str(tmp_path), subjects="logic", shots=4)
    write_csv(tmp_path / "test/logic_test.csv", [head[:-2], [0, "问____", "a", "b", "c", "d"]])
    with pytest.raises(SystemExit, match="no answer column"):
        ev.load_letter_task("ceval", str(tmp_path), split="test")


def test_mmlu_and_cmmlu_layouts(tmp_path):
    write_csv(tmp_path / "mmlu/dev/anatomy_dev.csv", [["What is 1+1?", "1", "2", "3", "4", "B"]])
    write_csv(tmp_path / "mmlu/test/anatomy_test.csv", [["Bones?", "206", "100", "5", "0", "A"],
                                                        ["Bad row", "1", "2", "3", "4", "E"]])
    with pytest.raises(SystemExit, match=r"anatomy_test.csv:2: answer 'E'"):
        ev.load_letter_task("mmlu", str(tmp_path / "mmlu"), shots=1)
    write_csv(tmp_path / "mmlu/test/anatomy_test.csv", [["Bones?", "206", "100", "5", "0", "A"]])
    [item] = ev.load_letter_task("mmlu", str(tmp_path / "mmlu"), shots=1)
    assert item.context == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                            "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                            "Bones?\nA. 206\nB. 100\nC. 5\nD. 0\nAnswer:")
    assert item.label == 0 and item.sep == " "
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(tmp_path / "cmmlu/dev/arts.csv", [head, [0, "甲", "1", "2", "3", "4", "D"]])
    write_csv(tmp_path / "cmmlu/test/arts.csv", [head, [0, "乙", "1", "2", "3", "4", "C"]])
    [item] = ev.load_letter_task("cmmlu", str(tmp_path / "cmmlu"), shots=1, sep=" ")
    assert item.context == ("以下是关于arts的单项选择题，请直接给出正确答案的选项。\n\n"
                            "甲\nA. 1\nB. 2\nC. 3\nD. 4\n答案： D\n\n乙\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert item.label == 2 and item.subject == "arts"


def test_hellaswag_forms_give_lm_eval_contexts(tmp_path):
    rowanz = [{"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
               "endings": ["is using wrap.", "starts pulling up roofing on a roof."], "label": 1},
              {"activity_label": "Health", "ctx_a": "[header] How to sleep well [title] Stop exercising late. "
                                                    "[step] When you exercise, you  heat up.", "ctx_b": "",
               "endings": ["Keep [substeps] cool.", "Run."], "label": 0}]
    klosax = [{"ctx": "Roof shingle removal: A man is sitting on a roof. he",
               "endings": ["is using wrap.", "starts pulling up roofing on a roof."], "label": 1},
              {"ctx": "Health: How to sleep well. Stop exercising late. When you exercise, you heat up.",
               "endings": ["Keep cool.", "Run."], "label": 0}]
    for name, records in (("rowanz_val.jsonl", rowanz), ("klosax_val.jsonl", klosax)):
        with open(tmp_path / name, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    a = ev.load_hellaswag(str(tmp_path / "rowanz_val.jsonl"))
    b = ev.load_hellaswag(str(tmp_path / "klosax_val.jsonl"))
    assert a[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert a[1].context == "Health: How to sleep well. Stop exercising late. When you exercise, you heat up."
    assert a[1].choices == ["Keep cool.", "Run."]
    assert [(i.context, i.choices, i.label) for i in a] == [(i.context, i.choices, i.label) for i in b]
    # lm-evaluation-harness strips before it removes the markers, so an ending that starts with one keeps a space
    assert ev.hellaswag_preprocess("[substeps] Keep cool.") == " Keep cool."


def test_mc_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "Sky is", "choices": ["blue", "green"], "label": 0}\n'
                    '{"context": "Grass is", "choices": ["green"], "label": 0}\n')
    with pytest.raises(SystemExit, match=r"items.jsonl:2: needs at least 2 choices"):
        ev.load_mc(str(path))
    path.write_text('{"context": "Sky is", "choices": ["blue", "green"], "label": 2}\n')
    with pytest.raises(SystemExit, match=r"items.jsonl:1: label 2 is out of range"):
        ev.load_mc(str(path))
    path.write_text('{"context": "Sky is", "choices": ["blue", "green"]}\n')
    with pytest.raises(SystemExit, match=r"items.jsonl:1: KeyError\('label'\)"):
        ev.load_mc(str(path))
    path.write_text('{"context": "天是", "choices": ["蓝的", "绿的"], "label": 0, "sep": ""}\n')
    assert ev.load_mc(str(path))[0].sep == ""


@pytest.mark.parametrize("loader,record,message", [
    ("load_mc", {"context": "Sky is", "choices": "abc", "label": 0}, "choices must be a list of strings, got str"),
    ("load_mc", {"context": "Sky is", "choices": ["a", 2], "label": 0}, "choices must be a list of strings"),
    ("load_mc", {"context": "Sky is", "choices": ["a", "b"], "label": "0"}, "label must be an int"),
    ("load_mc", {"context": "Sky is", "choices": ["a", "b"], "label": True}, "label must be an int"),
    ("load_mc", {"context": "Sky is", "choices": ["a", "b"], "label": 0, "sep": 1}, "sep must be strings"),
    ("load_mc", {"context": ["Sky"], "choices": ["a", "b"], "label": 0}, "context and sep must be strings"),
    ("load_hellaswag", {"ctx": "A man", "endings": "abcd", "label": 0}, "endings must be a list of strings"),
    ("load_hellaswag", {"ctx": "A man", "endings": ["a", "b"], "label": 0.5}, "label must be an int"),
    ("load_arc", {"question": "Why?", "choices": {"text": "ab", "label": ["A", "B"]}, "answerKey": "A"},
     "choices.text must be a list of strings"),
    ("load_arc", {"question": {"stem": "Why?", "choices": "AB"}, "answerKey": "A"}, "choices must be a list"),
])
def test_mc_records_of_the_wrong_shape_are_refused(tmp_path, loader, record, message):
    """A string where a list belongs would otherwise split into one choice per character."""
    path = tmp_path / "items_val_test.jsonl"
    good = {"load_mc": {"context": "ok", "choices": ["a", "b"], "label": 0},
            "load_hellaswag": {"ctx": "A man", "endings": ["a", "b"], "label": 0},
            "load_arc": {"question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}}
    path.write_text(json.dumps(good[loader]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SystemExit, match=f"items_val_test.jsonl:2: .*{re.escape(message)}"):
        getattr(ev, loader)(str(path))


def test_hellaswag_label_may_be_a_digit_string(tmp_path):
    """The HF datasets copy of HellaSwag stores label as "0".."3"."""
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "endings": ["a", "b"], "label": "1"}) + "\n")
    assert ev.load_hellaswag(str(path))[0].label == 1


def test_shared_benchmarks_load(shared_data):
    hs = ev.load_hellaswag(os.path.join(shared_data, "eval_en/hellaswag"))
    assert len(hs) == 10042 and hs[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    hs_file = os.path.join(shared_data, "eval_en/hellaswag/hellaswag_val.jsonl.gz")
    raw = [d["ctx"] for _, d in readers.read_jsonl(hs_file)]
    # 3236 ActivityNet items get their ctx_b capitalized; 2 WikiHow ones lose a [bracketed] span to lm-eval's regex
    assert sum(r != i.context for r, i in zip(raw, hs)) == 3238
    arc = ev.load_arc(os.path.join(shared_data, "eval_en/arc_easy"))
    assert len(arc) == 2376 and arc[0].context.startswith("Question: ") and arc[0].context.endswith("\nAnswer:")
    ceval = ev.load_letter_task("ceval", os.path.join(shared_data, "eval_zh/ceval"), shots=5)
    assert len(ceval) == 1346 and len({i.subject for i in ceval}) == 52
    assert all(i.context.count("答案：") == 6 for i in ceval)
    mmlu = ev.load_letter_task("mmlu", os.path.join(shared_data, "eval_en/mmlu"), subjects="anatomy", shots=5)
    assert len(mmlu) == 135 and mmlu[0].context.count("\nAnswer:") == 6


# ---------------------------------------------------------------------------------------------- checkpoints, CLI

def test_cli_mc_and_ppl_match_the_library(ckpt_folder, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": c, "choices": ["blue", "green", "red"], "label": k % 3}) + "\n"
                             for k, c in enumerate(["The sky is", "Grass is", "Blood is", "Snow is"])))
    out = tmp_path / "r.json"
    cmd = [sys.executable, "eval.py", f"--ckpt={ckpt_folder}", "--task=mc", f"--data={items}", "--dtype=float32",
           f"--out={out}", "--batch_size=3"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "acc_norm" in run.stdout
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    expected, _ = ev.mc_metrics(ev.load_mc(str(items)), ev.score_items(model, tok, ev.load_mc(str(items)), 2, desc=None))
    got = json.loads(out.read_text())["results"]["all"]
    assert got["n"] == 4 and {k: got[k] for k in expected} == pytest.approx(expected)

    text = tmp_path / "doc.txt"
    text.write_text("the cat sat on the mat. " * 12)
    cmd = [sys.executable, "eval.py", f"--ckpt={ckpt_folder}", "--task=ppl", f"--data={text}", "--dtype=float32",
           f"--out={out}", "--block_size=64", "--stride=32"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tokens = tok.encode(text.read_text()) + [tok.eos_id]
    want = inference.perplexity(model, tokens, 64, 32)
    want["bpb"] = want["loss"] * want["tokens"] / (len(text.read_text().encode("utf-8")) * math.log(2))
    assert json.loads(out.read_text())["results"]["ppl"] == pytest.approx(want)


def test_cli_generate_is_the_models_greedy_continuation(ckpt_folder, tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "g.json"
    prompts.write_text("the cat\n\nhello there\n")
    cmd = [sys.executable, "eval.py", f"--ckpt={ckpt_folder}", "--task=generate", f"--data={prompts}", "--chat=False",
           "--temperature=0", "--max_new_tokens=6", "--dtype=float32", f"--out={out}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    results = json.loads(out.read_text())["results"]
    assert [r["prompt"] for r in results] == ["the cat", "hello there"]
    for r in results:
        ids = tok.encode(r["prompt"])
        new = model.generate(torch.tensor([ids]), 6, temperature=0.0, stop_ids=tok.stop_ids)[0, len(ids):].tolist()
        assert r["completion"] == tok.decode([i for i in new if i not in tok.stop_ids], skip_special=True)
        assert r["completion"] in run.stdout


def test_load_model_quantized_and_refusals(ckpt_folder, tmp_path):
    import quant
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    config = quant.quantize_model(model, "int8")
    qdir = str(tmp_path / "int8")
    quant.save_quantized(model, qdir, config, tok)
    qmodel, qtok = inference.load_model(qdir, "cpu", "float32")
    assert any(isinstance(m, quant.QuantLinear) for m in qmodel.modules())
    tokens = tok.encode("the cat sat on the mat")
    assert inference.perplexity(qmodel, tokens, 64)["loss"] == pytest.approx(
        inference.perplexity(model, tokens, 64)["loss"], rel=1e-4)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(SystemExit, match="only LORA adapters are supported"):  # LoRA itself: tests/test_lora.py
        inference.load_model(str(adapter))
    cfg = json.loads(open(os.path.join(ckpt_folder, "config.json")).read())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    with open(os.path.join(ckpt_folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(SystemExit, match="'gptq' is not supported"):
        inference.load_model(ckpt_folder)


@pytest.mark.parametrize("kind,entry", [("safetensors", "../outside"), ("safetensors", "ABSOLUTE"),
                                        ("safetensors", "link"), ("bin", "../outside")])
def test_load_model_refuses_a_weight_map_entry_outside_the_folder(ckpt_folder, tmp_path, kind, entry):
    """An index's weight_map entry leading out of the model's folder (../x, an absolute path, a symlink out of it)
    is refused naming the entry and the index, even when it leads to valid weights. Entries inside load, and so do
    a hub cache snapshot's files, which link into the repo's blobs folder."""
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(ckpt_folder, "model.safetensors"))
    os.remove(os.path.join(ckpt_folder, "model.safetensors"))
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    suffix = ".safetensors" if kind == "safetensors" else ".bin"

    def write(path):
        if kind == "safetensors":
            save_file(weights, str(path))
        else:
            torch.save(weights, str(path))

    def with_index(folder, name):
        with open(os.path.join(folder, index), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: name for k in weights}}, f)

    write(os.path.join(ckpt_folder, "model-00001-of-00001" + suffix))
    with_index(ckpt_folder, "model-00001-of-00001" + suffix)
    model, _ = inference.load_model(ckpt_folder)
    write(tmp_path / ("outside" + suffix))
    name = {"ABSOLUTE": str(tmp_path / "outside"), "link": "link"}.get(entry, entry) + suffix
    if entry == "link":
        os.symlink(tmp_path / ("outside" + suffix), os.path.join(ckpt_folder, name))
    with_index(ckpt_folder, name)
    with pytest.raises(SystemExit, match=re.escape(f"{os.path.join(ckpt_folder, index)}: weight_map entry "
                                                   f"{next(iter(weights))!r} -> {name!r} points outside")):
        inference.load_model(ckpt_folder)

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "0123abc"  # the hub cache's layout
    blobs = tmp_path / "models--someone--tiny" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(ckpt_folder, snapshot, ignore=shutil.ignore_patterns("*" + suffix))
    write(blobs / "f00d")
    os.symlink("../../blobs/f00d", snapshot / ("model" + suffix))
    with_index(snapshot, "model" + suffix)
    assert inference.load_model(str(snapshot))[0].config == model.config


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("settings,message", [
    ({"task": "chat"}, "eval.py has no chat task: chat with a checkpoint with python chat.py"),
    ({"task": "hellaswg"}, "unknown --task='hellaswg'"),
    ({"method": "first_token"}, "--method=first_token applies to mmlu, ceval, cmmlu, not mc"),
    ({"ckpt": ""}, "--ckpt=PATH is required"),
    ({"data": ""}, "--task=mc needs --data=PATH"),
    ({"batch_size": 0}, "--batch_size=0: must be at least 1"),
    ({"limit": -1}, "--limit=-1: must be >= 0"),
    ({"stride": -8}, "--stride=-8: must be >= 0"),
    ({"task": "generate", "max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
    ({"task": "generate", "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ({"out": "/nonexistent/folder/r.json"}, "--out=/nonexistent/folder/r.json: not a file in an existing folder"),
])
def test_settings_that_cannot_work_are_refused_before_loading(monkeypatch, settings, message):
    for key, value in {"task": "mc", "ckpt": "m", "data": "d", "method": "loglik", **settings}.items():
        monkeypatch.setattr(ev, key, value)
    with pytest.raises(SystemExit, match=re.escape(message)):
        ev.check_settings()


def run_eval(*args):
    return subprocess.run([sys.executable, "eval.py", "--dtype=float32", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_generation_stops_at_the_context_and_bad_inputs_name_the_file(ckpt_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=generate", f"--data={prompts}", "--chat=False",
                   "--temperature=0", "--max_new_tokens=256")  # the model's context is 128
    assert run.returncode == 0, run.stderr
    assert "reply limited to 121 tokens" in run.stderr
    prompts.write_text("a" * 200 + "\n")
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=generate", f"--data={prompts}", "--chat=False")
    assert run.returncode == 1 and f"{prompts}: prompt 1: the prompt has 200 tokens" in run.stderr
    prompts.write_text("\n\n")
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=generate", f"--data={prompts}")
    assert run.returncode == 1 and f"{prompts}: no prompts" in run.stderr
    prompts.write_text("the cat\n")
    run = run_eval(f"--ckpt={tmp_path}", "--task=generate", f"--data={prompts}")
    assert run.returncode == 1 and "no config.json" in run.stderr and "Traceback" not in run.stderr


def test_load_model_refuses_a_device_it_cannot_use(ckpt_folder):
    with pytest.raises(SystemExit, match="device='gpu'"):
        inference.load_model(ckpt_folder, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="device='cuda': this torch sees no CUDA GPU"):
            inference.load_model(ckpt_folder, device="cuda")
    with pytest.raises(SystemExit, match="dtype='float64'"):
        inference.load_model(ckpt_folder, dtype="float64")


def test_cli_ppl_reads_a_data_folder_through_the_data_layer(ckpt_folder, tmp_path):
    """--data=<data folder> scores its val.bin; data made with another tokenizer is refused, not warned about."""
    tok = inference.load_model(ckpt_folder)[1]
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.array(tok.encode("the cat sat on the mat. " * 8), dtype=np.uint16)
    tokens.tofile(data / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "format": "pretrain", "val_tokens": len(tokens),
            "tokenizer_sha256": tok.checksum()}
    (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "r.json"
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=ppl", f"--data={data}", f"--out={out}", "--block_size=64")
    assert run.returncode == 0, run.stderr
    model = inference.load_model(ckpt_folder)[0]
    want = inference.perplexity(model, tokens.astype(np.int64), 64)
    assert json.loads(out.read_text())["results"]["ppl"] == pytest.approx(want)
    (data / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=ppl", f"--data={data}")
    assert run.returncode == 1 and "another tokenizer" in run.stderr and "Traceback" not in run.stderr


def test_bos_needs_a_tokenizer_with_one(ckpt_folder, tmp_path):
    with open(os.path.join(ckpt_folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"context": "The sky is", "choices": ["blue", "green"], "label": 0}) + "\n")
    run = run_eval(f"--ckpt={ckpt_folder}", "--task=mc", f"--data={items}", "--bos=True")
    assert run.returncode == 1 and "--bos=True: the tokenizer of" in run.stderr and "Traceback" not in run.stderr


def test_load_model_refuses_a_tokenizer_bigger_than_the_embedding(tmp_path):
    """Token ids past the embedding table would fail deep inside the first forward pass."""
    path = str(tmp_path / "ckpt")
    tok = char_tokenizer_folder(path)
    convert.save_pretrained(tiny_transformer(tok.vocab_size - 1), path)
    with pytest.raises(SystemExit, match=f"the tokenizer has {tok.vocab_size} tokens but the model only "
                                         f"{tok.vocab_size - 1} embeddings"):
        inference.load_model(path)
