"""math_tasks.py and eval.py --task=gsm8k: answer extraction on real model outputs and tricky strings, answer
matching, the rewards, load_reward, load_problems on each layout and its refusals, the embedded tasks' (addition,
compare) held-out splits, the pass@k estimator against its formula, and evaluate() against greedy completions
computed one problem at a time with model.generate."""
import gzip
import json
import math
import os
import re
import subprocess
import sys
import zlib
from fractions import Fraction

import pytest
import torch

import convert
import inference
import math_tasks as mt
from conftest import char_tokenizer_folder, tiny_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Real completions of SmolLM2-135M-Instruct (GGUF Q4_1, bf16, greedy, max_new_tokens=256) to the first SVAMP
# questions in prompt_messages' chat prompt, generated once by hand with
#   python eval.py --ckpt=$GGUF --task=gsm8k --data=../shared/data/math_en/svamp --limit=8 --out=...
# and pasted here (their tails): (completion, the answer a reader takes from it).
SMOLLM2_OUTPUTS = [
    # the asked format, with "The answer is" after it
    ("Let's calculate the number of action figures on the shelf that were added to the shelf last: 10 - 7 = 2.\n\n"
     "So, there are 2 action figures on the shelf that were added to the shelf last.\n\n#### 2\n\nThe answer is 2.",
     "2"),
    ("The number of cookies Paco ate is 131 - 9 = 121 cookies.\nThe number of cookies Paco ate is 121 + 18 = 207 "
     "cookies.\n#### 207\nThe answer is: 207", "207"),
    # no "####": "the final answer is" with a unit, "the answer is" with a full stop
    ("So, 12 cents is 12 * 12 = 144 cents.\n\nSo, the final answer is 144 cents.", "144"),
    ("3. So, 14 salty cookies - 9 sweet cookies = 2 salty cookies.\n\nNow, we can write the final answer as 14 + 2 = "
     "16 salty cookies.\n\nSo, the answer is 16.", "16"),
    # "The final answer is" followed by a sum: the result after "=" is the answer, not the first addend
    ("Now, we can combine the two parts: 43 children, 21 children left on the bus, and 21 children got off the bus."
     "\n\nThe final answer is 43 + 21 = 64.\n\nSo, there were 64 children who got off the bus at the bus stop.", "64"),
    # looping "####" lines, cut off by max_new_tokens in the middle of a number: the last one counts
    ("Therefore, I will add 288000 to the final answer:\n\n#### 288000\n#### 288000\n#### 288000\n#### 2880", "2880"),
    # cut off with no marker at all: the last number
    ("We can also find the number of children that got off by dividing 110 by the number of children that got on. "
     "So, we have 110 / 110 = 1.\n\nSo, there are 1 more children that got", "1"),
    ("We know that 2189 - 49 = 2221. So, the total amount of money collected at the atm is 2221.\n\nWe can multiply "
     "the number of dollars she collected by the amount of money she collected, which is 49, and then add it to the "
     "original amount of money collected at the atm.\n\nThis is a fraction of the original", "49"),
]


@pytest.mark.parametrize("text,answer", SMOLLM2_OUTPUTS)
def test_extract_answer_on_real_model_outputs(text, answer):
    assert mt.extract_answer(text) == answer


@pytest.mark.parametrize("text,answer", [
    ("1,234", "1234"), ("$1,234.50", "1234.50"), ("-7", "-7"), ("7.", "7"), ("no number", None), ("", None),
    ("#### 12 apples", "12"), ("The answer is: 3/4", "3/4"), ("答案是 42", "42"), ("所以答案是42。", "42"),
    ("#### -5", "-5"), ("It costs $ 4.", "4"), ("He paid -$3 in fees", "-3"), ("5-3=2", "2"),
    ("I have 1, 2, 3", "3"), ("x2 plus a3", None), ("\\boxed{17} is wrong, \\boxed{18}", "18"),
    ("#### 1,234.\n", "1234"), ("the answer is 12.5 kg, not 3", "12.5"), ("####\n42", "42"),
    ("#### 9\nsome more text with 3 numbers 4", "9"), ("The answer is 16. Then 5 = 5", "16"),
    ("THE ANSWER IS 8", "8"), ("it is 1.5.", "1.5"), ("1234567", "1234567"), ("12,34", "34"), ("1,2345", "2345"),
    ("so 12 - 3", "3"), ("10 - 7 = 3 left, 45 - 5", "5"), ("-$3.50 each", "-3.50"), ("a loss of −4", "-4"),
])
def test_extract_answer_tricky_strings(text, answer):
    assert mt.extract_answer(text) == answer


@pytest.mark.parametrize("predicted,gold,same", [
    ("1,000", "1000.0", True), ("1000", "1000", True), ("3/4", "0.75", True), ("2.50", "2.5", True),
    ("$5", "5", True), ("-3", "3", False), ("0.333", "1/3", False), (None, "5", False), (None, "None", False),
    ("Paris", " Paris ", True), ("paris", "Paris", False), ("5", "five", False), ("1/0", "1/0", True),
])
def test_answers_match(predicted, gold, same):
    assert mt.answers_match(predicted, gold) is same


def test_to_number_is_exact():
    assert mt.to_number("$1,234.50") == Fraction(246900, 200)
    assert mt.to_number("-3/4") == Fraction(-3, 4)
    assert mt.to_number("12 apples") is None and mt.to_number("1/0") is None


# ---------------------------------------------------------------------------------------------------- rewards

def test_gsm8k_answer_reward():
    completions = ["so 2 + 3 = 5\n#### 5", "#### 1,000", "The answer is 7.", "I do not know", "#### 12 apples"]
    answers = ["5", "1000", "8", "0", "12"]
    assert mt.gsm8k_answer([""] * 5, completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_format_reward():
    completions = ["2 + 3 = 5\n#### 5", "#### 5.", "#### -1,234.50\n\n", "#### 5 apples", "#### 5\nThe answer is 5",
                   "The answer is 5", "####", "", "#### $5"]
    assert mt.format_reward([""] * 9, completions, [""] * 9) == [1, 1, 1, 0, 0, 0, 0, 0, 1]
    assert mt.REWARDS["format"] is mt.format_reward


def test_length_penalty():
    completions = ["", "a" * 600, "a" * 900, "a" * 1200, "a" * 100_000, "答" * 900]
    assert mt.length_penalty([""] * 6, completions, [""] * 6) == [0.0, 0.0, -0.5, -1.0, -1.0, -0.5]
    assert mt.length_penalty(["", ""], ["abcd", "abcdef"], ["", ""], soft_chars=2, max_chars=6) == [-0.5, -1.0]
    with pytest.raises(ValueError, match="soft_chars"):
        mt.length_penalty([""], ["x"], [""], soft_chars=5, max_chars=5)


@pytest.mark.parametrize("name", list(mt.REWARDS))
def test_rewards_refuse_mismatched_lengths(name):
    with pytest.raises(ValueError, match="2 prompts, 1 completions and 2 answers"):
        mt.REWARDS[name](["a", "b"], ["c"], ["1", "2"])


def test_load_reward(tmp_path, monkeypatch):
    assert mt.load_reward("gsm8k_answer") is mt.gsm8k_answer
    assert mt.load_reward("math_tasks:length_penalty") is mt.length_penalty
    module = tmp_path / "my_rewards.py"
    module.write_text("def exact(prompts, completions, answers):\n"
                      "    return [float(c.strip() == a) for c, a in zip(completions, answers)]\n")
    fn = mt.load_reward(f"{module}:exact")
    assert fn(["", ""], ["5", " 6"], ["5", "7"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mt.load_reward("my_rewards:exact")(["q"], ["1"], ["1"]) == [1.0]
    for bad, message in [("accuracy", "expected one of gsm8k_answer, format, length_penalty or module:function"),
                         ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
                         ("math_tasks:no_such_function", "math_tasks has no function no_such_function"),
                         ("math_tasks:NUMBER", "math_tasks has no function NUMBER"),
                         (f"{tmp_path}/absent.py:f", "absent.py not found"), (":f", "module:function")]:
        with pytest.raises(SystemExit, match=message):
            mt.load_reward(bad)


# ---------------------------------------------------------------------------------------------------- problems

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_problems_gsm8k_jsonl(tmp_path):
    path = write(tmp_path / "test.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"question": "Janet has 3 eggs and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5 eggs.\n#### 5"},
        {"question": "A farm sells 1,200 eggs at $2. Revenue?", "answer": "1200 * 2 = 2400\n#### 2,400"},
        {"question": "What is half of 7?", "answer": 3.5}]))
    assert mt.load_problems(path) == [
        {"question": "Janet has 3 eggs and buys 2. How many?", "answer": "5"},
        {"question": "A farm sells 1,200 eggs at $2. Revenue?", "answer": "2400"},
        {"question": "What is half of 7?", "answer": "3.5"}]
    assert len(mt.load_problems(path, limit=2)) == 2
    with open(path, "rb") as f, gzip.open(tmp_path / "test.jsonl.gz", "wb") as g:
        g.write(f.read())
    assert mt.load_problems(str(tmp_path / "test.jsonl.gz")) == mt.load_problems(path)


def test_load_problems_svamp_and_lists(tmp_path):
    folder = tmp_path / "svamp"
    folder.mkdir()
    write(folder / "SVAMP.json", json.dumps([
        {"ID": "chal-2", "Body": "Dan had $ 3 left. If he had $ 4 at the start", "Question": "How much did he spend?",
         "Equation": "( 4.0 - 3.0 )", "Answer": 1.0, "Type": "Subtraction"},
        {"ID": "chal-3", "Body": "Each box holds 5 pens.", "Question": "How many pens in 2 boxes?", "Answer": 10.0}],
        indent=1))
    write(folder / "SOURCE.json", json.dumps({"name": "not problems"}))  # skipped in a folder, as readers does
    write(folder / "LICENSE", "MIT")
    assert mt.load_problems(str(folder)) == [
        {"question": "Dan had $ 3 left. If he had $ 4 at the start. How much did he spend?", "answer": "1"},
        {"question": "Each box holds 5 pens. How many pens in 2 boxes?", "answer": "10"}]
    path = write(tmp_path / "capitals.json", json.dumps([{"question": "Capital of France?", "answer": "Paris"}]))
    assert mt.load_problems(path) == [{"question": "Capital of France?", "answer": "Paris"}]


def test_load_problems_real_svamp(shared_data):
    problems = mt.load_problems(os.path.join(shared_data, "math_en", "svamp"))
    assert len(problems) == 1000
    assert problems[0] == {"question": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
                                       "each pack. How much do you have to pay to buy each pack?", "answer": "51"}
    assert all(mt.to_number(p["answer"]) is not None for p in problems)


@pytest.mark.parametrize("lines,message", [
    (['{"question": "q1", "answer": "#### 1"}', '{"question": "q2"}'], r"bad\.jsonl:2: expected question and answer"),
    (['{"question": "q1", "answer": "1"}', '', '{"question": "q2", "answer": "no number ####"}'],
     r"bad\.jsonl:3: no number after the answer's '####'"),
    (['{"question": "q1", "answer": null}'], r"bad\.jsonl:1: the answer must be a number or a string, got NoneType"),
    (['{"question": "q1", "answer": [1]}'], r"bad\.jsonl:1: the answer must be a number or a string, got list"),
    (['{"question": "q1", "answer": true}'], r"bad\.jsonl:1: the answer must be a number or a string, got bool"),
    (['{"question": "  ", "answer": "1"}'], r"bad\.jsonl:1: the question is empty"),
    (['{"question": "q", "answer": ""}'], r"bad\.jsonl:1: the answer is empty"),
    (['{"question": "q1", "answer": "1"}', '{"question": "q2", "answer": '], r"bad\.jsonl:2: malformed JSON"),
    (['["q", "1"]'], r"bad\.jsonl:1: expected an object with question and answer, got list"),
    ([''], r"bad\.jsonl: no problems"),
])
def test_load_problems_names_bad_records(tmp_path, lines, message):
    path = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=message) as stop:
        mt.load_problems(path)
    assert "lenient" not in str(stop.value)  # eval.py has no --lenient to offer


def test_load_problems_refuses_missing_and_empty(tmp_path):
    with pytest.raises(SystemExit, match="no .json or .jsonl files"):
        mt.load_problems(write(tmp_path / "notes.txt", "What is 2 + 2?\n"))
    with pytest.raises(SystemExit, match="absent.jsonl"):
        mt.load_problems(str(tmp_path / "absent.jsonl"))
    with pytest.raises(SystemExit, match=r"bad\.json:1: the answer nan is not a finite number"):
        mt.load_problems(write(tmp_path / "bad.json", '[{"question": "q", "answer": NaN}]'))


# ---------------------------------------------------------------------------------------------------- addition

def pair(problem):
    a, b = problem["question"].removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a), int(b)


def test_addition_problems():
    problems = mt.addition_problems(50, digits=3, seed=1)
    assert len({p["question"] for p in problems}) == 50
    for p in problems:
        a, b = pair(p)
        assert 100 <= a <= 999 and 100 <= b <= 999 and p["answer"] == str(a + b)
    assert mt.addition_problems(50, digits=3, seed=1) == problems
    assert mt.addition_problems(50, digits=3, seed=2) != problems
    assert {pair(p) for p in mt.addition_problems(80, digits=1, split="train")} <= {(a, b) for a in range(10)
                                                                                    for b in range(10)}


def test_addition_held_out_split_is_disjoint_whatever_the_seed():
    # the documented rule: an unordered pair is held out when crc32("min+max") % 10 == 0
    pairs = {(a, b) for a in range(10, 100) for b in range(10, 100)}
    held_out = {(a, b) for a, b in pairs if zlib.crc32(f"{min(a, b)}+{max(a, b)}".encode()) % 10 == 0}
    assert 600 < len(held_out) < 1000
    train = mt.addition_problems(len(pairs) - len(held_out), digits=2, seed=3, split="train")
    evals = mt.addition_problems(len(held_out), digits=2, seed=4, split="eval")
    assert {pair(p) for p in evals} == held_out and {pair(p) for p in train} == pairs - held_out
    assert all((b, a) in held_out for a, b in held_out)          # "58 + 37" is held out with "37 + 58"
    with pytest.raises(ValueError, match=f"only {len(held_out)} eval questions with digits=2, asked for 8100"):
        mt.addition_problems(8100, digits=2, split="eval")


def test_load_problems_addition_spec():
    assert mt.load_problems("addition", limit=5) == mt.addition_problems(5, 2, 0, "eval")
    assert mt.load_problems("addition:digits=3,n=7,seed=2,split=train") == mt.addition_problems(7, 3, 2, "train")
    assert len(mt.load_problems("addition")) == 200
    for spec, message in [("addition:digit=3", "keys digits, n, seed, split"), ("addition:n=x", "n='x' is not an"),
                          ("addition:split=test", "expected train or eval"), ("addition:n=0", "at least 1"),
                          ("addition:digits=9", "expected 1 to 6"), ("addition:digits=1,n=90", "only")]:
        with pytest.raises(SystemExit, match=message):
            mt.load_problems(spec)


def compared(problem):
    a, b = problem["question"].removeprefix("Which is larger, ").removesuffix("?").split(" or ")
    return int(a), int(b)


def test_compare_problems_and_their_held_out_split():
    # the documented rule, with the task's own sign: a pair is held out when crc32("min>max") % 10 == 0
    pairs = {(a, b) for a in range(10, 100) for b in range(10, 100) if a != b}
    held_out = {(a, b) for a, b in pairs if zlib.crc32(f"{min(a, b)}>{max(a, b)}".encode()) % 10 == 0}
    assert 600 < len(held_out) < 1000
    train = mt.compare_problems(len(pairs) - len(held_out), digits=2, seed=3, split="train")
    evals = mt.compare_problems(len(held_out), digits=2, seed=4, split="eval")
    assert {compared(p) for p in evals} == held_out and {compared(p) for p in train} == pairs - held_out
    assert all((b, a) in held_out for a, b in held_out)  # "58 or 37" is held out with "37 or 58"
    for p in train[:500] + evals:
        assert p["answer"] == str(max(compared(p)))
    assert sum(int(p["answer"]) == compared(p)[0] for p in train) == len(train) // 2  # the larger is first half the time
    assert mt.load_problems("compare:digits=3,n=7,seed=2,split=train") == mt.compare_problems(7, 3, 2, "train")
    assert mt.load_problems("compare", limit=5) == mt.compare_problems(5, 2, 0, "eval")
    assert mt.gsm8k_answer(["q"] * 2, ["#### 82", "#### 47"], ["82", "82"]) == [1.0, 0.0]
    for spec, message in [("compare:digit=3", "expected compare:key=value"), ("compare:split=test", "compare split"),
                          ("compare:digits=1,n=90", r"compare: only \d+ eval questions with digits=1")]:
        with pytest.raises(SystemExit, match=message):
            mt.load_problems(spec)


def test_prompt_messages():
    messages = mt.prompt_messages("What is 2 + 3?")
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"].startswith("What is 2 + 3?\n") and '"#### <number>"' in messages[0]["content"]


# ---------------------------------------------------------------------------------------------------- metrics

def test_pass_at_k_against_the_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert mt.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert mt.pass_at_k(200, 7, 1) == pytest.approx(7 / 200)
    with pytest.raises(ValueError):
        mt.pass_at_k(4, 5, 1)


def test_majority_and_score_by_hand():
    assert mt.majority(["5", "6", "5.0", None, "6", "6"]) == "6"
    assert mt.majority(["5", "6"]) == "5"          # a tie goes to the first seen
    assert mt.majority(["1,000", "1000", "7"]) == "1,000"
    assert mt.majority([None, None]) is None
    records = [{"gold": "5", "extracted": ["5", "5.0", "4", None]},       # 2 of 4 correct, majority 5 (first 3)
               {"gold": "3", "extracted": ["1", "2", "2", "3"]},         # 1 of 4, majority 2
               {"gold": "7", "extracted": [None, None, None, None]}]     # 0 of 4
    metrics = mt.score(records, 3)
    assert metrics["problems"] == 3 and metrics["samples"] == 4
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert metrics["maj@3"] == pytest.approx(1 / 3)
    # pass@3 from 4 samples: 1 - C(2,3)/C(4,3) = 1 and 1 - C(3,3)/C(4,3) = 3/4
    assert metrics["pass@3"] == pytest.approx((1 + 3 / 4 + 0) / 3)
    assert set(mt.score(records[:1], 1)) == {"problems", "samples", "pass@1"}


# ---------------------------------------------------------------------------------------------------- evaluate

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?!'\"#+<>$=\n0123456789"


def math_tokenizer_folder(path):
    """A character tokenizer (ChatML specials) whose alphabet has the prompt's "#", "+", quotes and angle brackets
    (conftest's default alphabet has none of them)."""
    return char_tokenizer_folder(path, CHARS)


@pytest.fixture
def tiny_math(tmp_path):
    """(model, tok, folder): a tiny random LLaMA (context 256) with the character tokenizer, saved as a checkpoint."""
    path = str(tmp_path / "ckpt")
    tok = math_tokenizer_folder(path)
    model = tiny_transformer(tok.vocab_size, max_seq_len=256, seed=3)
    convert.save_pretrained(model, path)
    return model, tok, path


def greedy_one_at_a_time(model, tok, question, max_new_tokens):
    """The reference: the greedy completion of one prompt alone (no batch, no padding), cut at the first stop id;
    (text, tokens before the stop)."""
    ids = tok.encode(inference.render_chat(tok, mt.prompt_messages(question)))
    new = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.0)[0, len(ids):].tolist()
    end = next((j for j, t in enumerate(new) if t in tok.stop_ids), len(new))
    return tok.decode(new[:end], skip_special=True), end


def test_evaluate_greedy_against_one_at_a_time_generation(tiny_math):
    model, tok, _ = tiny_math
    questions = [f"What is {a} + {b}?" for a, b in [(1, 2), (13, 58), (7, 7), (40, 2), (99, 1), (5, 60)]]
    reference, lengths = zip(*[greedy_one_at_a_time(model, tok, q, 30) for q in questions])
    found = [mt.extract_answer(c) for c in reference]
    assert sum(a is not None for a in found) >= 2, f"the tiny model wrote too few numbers to test with: {reference}"
    # gold: the model's own answer for every other problem with one, a wrong one elsewhere
    gold = [a if a is not None and i % 2 == 0 else "123456789" for i, a in enumerate(found)]
    expected = sum(a is not None and i % 2 == 0 for i, a in enumerate(found)) / len(questions)
    problems = [{"question": q, "answer": g} for q, g in zip(questions, gold)]
    result = mt.evaluate(model, tok, problems, max_new_tokens=30, batch_size=4)   # batches of mixed lengths
    assert result["pass@1"] == pytest.approx(expected) and expected > 0
    assert [r["completions"] for r in result["records"]] == [[c] for c in reference]
    assert [r["extracted"] for r in result["records"]] == [[a] for a in found]
    assert [r["question"] for r in result["records"]] == questions and result["samples"] == 1
    assert result["format"] == sum(mt.format_reward(reference, reference, reference)) / len(reference)
    assert result["tokens"] == sum(lengths)


def test_evaluate_sampling(tiny_math):
    model, tok, _ = tiny_math
    problems = [{"question": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(3)]
    result = mt.evaluate(model, tok, problems, k=2, n=5, temperature=1.0, max_new_tokens=12, batch_size=8, seed=7)
    assert all(len(r["completions"]) == 5 for r in result["records"])
    # the metrics are score()'s of these records: set the golds to sampled answers so they are not all zero
    records = [dict(r, gold=next((a for a in r["extracted"] if a is not None), "0")) for r in result["records"]]
    metrics = mt.score(records, 2)
    correct = [[mt.answers_match(a, r["gold"]) for a in r["extracted"]] for r in records]
    assert metrics["pass@1"] == pytest.approx(sum(sum(c) / 5 for c in correct) / 3)
    assert metrics["pass@2"] == pytest.approx(sum(1 - math.comb(5 - sum(c), 2) / math.comb(5, 2)
                                                  for c in correct) / 3)
    assert set(result) >= {"pass@1", "maj@2", "pass@2", "format", "records", "seconds", "tokens"}
    again = mt.evaluate(model, tok, problems, k=2, n=5, temperature=1.0, max_new_tokens=12, batch_size=8, seed=7)
    assert again["records"] == result["records"]                       # the seed fixes the samples
    smaller = mt.evaluate(model, tok, problems, k=2, n=5, temperature=1.0, max_new_tokens=12, batch_size=2, seed=7)
    assert smaller["records"] == result["records"]                     # whatever the batch size
    other = mt.evaluate(model, tok, problems, k=2, n=5, temperature=1.0, max_new_tokens=12, batch_size=8, seed=8)
    assert other["records"] != result["records"]


def test_evaluate_refusals_and_the_context(tiny_math, capsys):
    model, tok, _ = tiny_math
    long = [{"question": "x" * 150, "answer": "1"}]
    n_prompt = len(tok.encode(inference.render_chat(tok, mt.prompt_messages(long[0]["question"]))))
    result = mt.evaluate(model, tok, long, max_new_tokens=200)
    assert f"completions limited to {256 - n_prompt} tokens" in capsys.readouterr().err
    assert result["tokens"] <= 256 - n_prompt
    problem = [{"question": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(ValueError, match="need temperature > 0"):
        mt.evaluate(model, tok, problem, k=4)
    with pytest.raises(ValueError, match="n >= k"):
        mt.evaluate(model, tok, problem, k=4, n=2, temperature=1.0)
    with pytest.raises(ValueError, match=r"problem 2: its prompt has \d+ tokens, the model's whole context is 256"):
        mt.evaluate(model, tok, problem + [{"question": "x" * 300, "answer": "1"}])


# ---------------------------------------------------------------------------------------------------- eval.py

def run_eval(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--task=gsm8k", "--dtype=float32", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_eval_py_gsm8k_end_to_end(tiny_math, tmp_path):
    model, tok, ckpt = tiny_math
    questions = ["What is 2 + 2?", "Tom has 3 pens and buys 4. How many?"]
    reference = [greedy_one_at_a_time(model, tok, q, 16)[0] for q in questions]
    golds = [mt.extract_answer(reference[0]) or "5", "7"]
    data = write(tmp_path / "test.jsonl", "".join(json.dumps({"question": q, "answer": f"#### {g}"}) + "\n"
                                                   for q, g in zip(questions, golds)))
    out = str(tmp_path / "result.json")
    r = run_eval(f"--ckpt={ckpt}", f"--data={data}", "--max_new_tokens=16", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out) as f:
        results = json.load(f)["results"]
    expected = sum(mt.answers_match(mt.extract_answer(c), g) for c, g in zip(reference, golds)) / 2
    assert results["pass@1"] == expected and "pass@1" in r.stdout
    assert [x["completions"] for x in results["records"]] == [[c] for c in reference]


def test_eval_py_gsm8k_sampling(tiny_math, tmp_path, monkeypatch, capsys):
    """eval.py's main() in this process (its settings restored afterwards): k=2 from 3 samples on the addition task."""
    import configurator
    import eval as ev
    _, _, ckpt = tiny_math
    for key in configurator.config_keys(vars(ev)):
        monkeypatch.setattr(ev, key, getattr(ev, key))
    out = str(tmp_path / "result.json")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--task=gsm8k", f"--ckpt={ckpt}", "--data=addition:n=3", "--k=2",
                                      "--samples=3", "--max_new_tokens=8", "--dtype=float32", f"--out={out}"])
    ev.main()
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "pass@1" in line).split()
    assert header == ["problems", "pass@1", "maj@2", "pass@2", "format", "tokens", "seconds"]
    with open(out) as f:
        results = json.load(f)["results"]
    assert [len(x["completions"]) for x in results["records"]] == [3, 3, 3]
    assert [x["question"] for x in results["records"]] == [p["question"] for p in mt.load_problems("addition:n=3")]
    assert {k: results[k] for k in ("pass@1", "maj@2", "pass@2")} == {
        k: v for k, v in mt.score(results["records"], 2).items() if "@" in k}


@pytest.mark.parametrize("settings,message", [
    ({"k": 2, "temperature": 0.0}, "--k=2 samples completions: it needs --temperature > 0 (k=1 is greedy)"),
    ({"k": 3, "samples": 2}, "--k=3 --samples=2: need k >= 1 and samples 0 (= k) or >= k"),
    ({"k": 0}, "--k=0 --samples=0: need k >= 1"),
    ({"samples": -1}, "--k=1 --samples=-1: need k >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
    ({"data": ""}, "--task=gsm8k needs --data=PATH"),
])
def test_eval_py_gsm8k_settings_refused_before_loading(monkeypatch, settings, message):
    import eval as ev
    for key, value in {"task": "gsm8k", "ckpt": "m", "data": "addition", **settings}.items():
        monkeypatch.setattr(ev, key, value)
    with pytest.raises(SystemExit, match=re.escape(message)):
        ev.check_settings()
