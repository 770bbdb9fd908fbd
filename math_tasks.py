"""Math word problems with answers a program can check: the problems, the prompt, the final-answer extraction, the
rewards rl.py optimises and the generative evaluation of eval.py --task=gsm8k (pass@1, maj@k, pass@k).

    problems = math_tasks.load_problems("../shared/data/math_en/svamp", limit=200)   # [{"question", "answer"}]
    problems = math_tasks.load_problems("compare:n=200,split=eval")                   # an embedded task
    math_tasks.extract_answer("... so she has 1,234 apples.\\n#### 1,234")            # "1234"
    math_tasks.REWARDS["gsm8k_answer"](prompts, completions, answers)               # [1.0, 0.0, ...]
    math_tasks.evaluate(model, tok, problems)                                       # {"pass@1": 0.31, ...}

Problems (load_problems): GSM8K JSON Lines ({question, answer}, the answer's worked solution ending in "#### 42"),
SVAMP's JSON list ({Body, Question, Answer}: the question is Body + Question), any {question, answer} JSON Lines or
JSON list (a number or an exact string); a file, a folder of such files or "<task>[:key=value,...]", an embedded
task (TASKS), which needs no download: "compare" (which of two numbers is larger: a tiny model learns the rule and
applies it to unseen pairs) or "addition" (small models memorise the sums they train on, not unseen ones).

The final answer of a completion (extract_answer), first rule that finds one: the number after the last "####"
(GSM8K's convention, which the prompt asks for), in the last \\boxed{}, after the last "the answer is" ("答案是"),
else the last number in the text; after a marker, an "=" in its clause wins ("The answer is 43 + 21 = 64" -> "64").
A number: optional minus and "$", digits with thousands commas, a decimal part, or a fraction a/b; "1,234" ->
"1234", "$5" -> "5", "7." -> "7". Answers compare as exact rationals when both parse (answers_match: "1,000" ==
"1000.0", "3/4" == "0.75"), else as stripped strings.

The embedded tasks' held-out split: a question is held out when crc32 of its unordered pair is divisible by 10
(_pairs), so "compare:split=train" and "compare:split=eval" never share a question, whatever the seeds.
"""
import importlib
import importlib.util
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from fractions import Fraction

from tqdm import tqdm

import inference
import readers
from engine import Engine, SamplingParams

# ---------------------------------------------------------------------------------------------------- problems

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
HELD_OUT = 10  # one unordered pair in HELD_OUT is an embedded task's held-out (eval) split


def _pairs(digits, seed, split, task):
    """The pairs (a, b) of `digits`-digit numbers of one split, each once, in an order the seed shuffles. A pair
    belongs to the eval split when crc32 of "min<sign>max" (sign: the task's) is divisible by HELD_OUT, whatever
    the seed or the order of the two numbers, so training and evaluation never share a question (not even
    "58 + 37" for "37 + 58"); the seed only picks which questions of the split, in which order."""
    if split not in ("train", "eval"):
        raise ValueError(f"{task} split={split!r}: expected train or eval")
    if not 1 <= digits <= 6:
        raise ValueError(f"{task} digits={digits}: expected 1 to 6")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
    # an odd step coprime with the square count walks every pair once, in an order the seed shuffles, without
    # listing all of them (10^12 for 6 digits)
    side, rng = high - low, random.Random(seed)
    count = side * side
    step = rng.randrange(1, count) | 1
    while math.gcd(step, count) != 1:
        step += 2
    start, sign = rng.randrange(count), TASKS[task][1]
    for i in range(count):
        a, b = divmod((start + i * step) % count, side)
        a, b = a + low, b + low
        if (zlib.crc32(f"{min(a, b)}{sign}{max(a, b)}".encode()) % HELD_OUT == 0) == (split == "eval"):
            yield a, b


def _take(n, pairs, question, task, digits, split):
    problems = []
    for a, b in pairs:
        problems.append(question(a, b))
        if len(problems) == n:
            return problems
    raise ValueError(f"{task}: only {len(problems)} {split} questions with digits={digits}, asked for {n}")


def addition_problems(n, digits=2, seed=0, split="eval"):
    """n questions "What is a + b?" (a, b of `digits` digits) with answer str(a + b), drawn without repeats by
    `seed` from one split (_pairs). Small models memorise the sums they train on but do not work out unseen ones."""
    return _take(n, _pairs(digits, seed, split, "addition"),
                 lambda a, b: {"question": f"What is {a} + {b}?", "answer": str(a + b)}, "addition", digits, split)


def compare_problems(n, digits=2, seed=0, split="eval"):
    """n questions "Which is larger, a or b?" (a != b, of `digits` digits) with answer str(max(a, b)), drawn
    without repeats by `seed` from one split (_pairs). The answer is a copy of one of the two numbers, chosen by
    comparing digits: a rule a tiny transformer learns from a few hundred pairs and applies to unseen ones, which
    makes it the embedded task whose held-out exact match GRPO can raise."""
    pairs = ((a, b) for a, b in _pairs(digits, seed, split, "compare") if a != b)
    return _take(n, pairs, lambda a, b: {"question": f"Which is larger, {a} or {b}?", "answer": str(max(a, b))},
                 "compare", digits, split)


# the embedded tasks: name -> (problems(n, digits, seed, split), the sign in the crc of a pair's held-out key)
TASKS = {"addition": (addition_problems, "+"), "compare": (compare_problems, ">")}


def _task_spec(spec, limit):
    """The problems of an embedded task: "compare" or "addition:digits=2,n=200,seed=0,split=eval" (n defaults to
    limit, else 200)."""
    task = spec.partition(":")[0]
    settings = {"digits": 2, "n": limit or 200, "seed": 0, "split": "eval"}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in settings:
            raise SystemExit(f"{spec!r}: expected {task}:key=value,... with keys {', '.join(settings)}")
        key, value = key.strip(), value.strip()
        if key != "split":
            try:
                value = int(value)
            except ValueError:
                raise SystemExit(f"{spec!r}: {key}={value!r} is not an integer") from None
        settings[key] = value
    if settings["n"] < 1:
        raise SystemExit(f"{spec!r}: n={settings['n']} must be at least 1")
    try:
        problems = TASKS[task][0](settings["n"], settings["digits"], settings["seed"], settings["split"])
    except ValueError as e:
        raise SystemExit(f"{spec!r}: {e}") from None
    return problems[:limit] if limit else problems


def load_problems(path, limit=0):
    """[{"question", "answer"}] of a file or folder (see the module docstring) or of an embedded task (TASKS);
    only the first `limit` (0 = all). A record without a question or a checkable answer stops with path:line."""
    if path.partition(":")[0] in TASKS:
        return _task_spec(path, limit)
    files = [f for f in readers.expand_inputs(path)[0] if f.endswith(JSON_SUFFIXES)]
    if not files:
        raise SystemExit(f"{path}: no .json or .jsonl files of problems")
    opts = {"text_field": "question", "txt_split": "line", "encoding": "utf-8"}
    problems = []
    for rec, where, line in readers.iter_records(files, opts, _stop, {}):
        try:
            problems.append(_problem(rec))
        except ValueError as e:
            _stop(where, line, str(e))
        if len(problems) == limit:
            break
    if not problems:
        raise SystemExit(f"{path}: no problems")
    return problems


def _stop(path, line, message):
    """A bad place in a problems file (readers' malformed JSON, broken .gz, or _problem's complaint) stops the run."""
    raise SystemExit(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


def _problem(rec):
    """{"question", "answer"} of one GSM8K, SVAMP or {question, answer} record; ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with question and answer, got {type(rec).__name__}")
    if "Body" in rec and "Question" in rec and "Answer" in rec:  # SVAMP: the body often lacks its final stop
        body, question = str(rec["Body"]).strip(), str(rec["Question"]).strip()
        question = f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {question}"
        answer = rec["Answer"]
    elif "question" in rec and "answer" in rec:
        question, answer = rec["question"], rec["answer"]
    else:
        raise ValueError(f"expected question and answer (or SVAMP's Body, Question, Answer); the record has "
                         f"{', '.join(list(rec)[:12]) or 'no fields'}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty or not a string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"the answer must be a number or a string, got {type(answer).__name__}")
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise ValueError(f"the answer {answer} is not a finite number")
        answer = str(int(answer)) if answer.is_integer() else repr(answer)
    elif isinstance(answer, str):
        if "####" in answer:  # GSM8K: the worked solution, then "#### 42"
            answer = _number_after(answer, "####")
            if answer is None:
                raise ValueError("no number after the answer's '####'")
        answer = answer.strip()
        if not answer:
            raise ValueError("the answer is empty")
    return {"question": question.strip(), "answer": str(answer)}


# ---------------------------------------------------------------------------------------------------- answers

def prompt_messages(question):
    """The chat messages that ask a question: reasoning first, then the final answer alone as "#### <number>"."""
    return [{"role": "user", "content": f"{question}\nThink step by step, then write the final answer on the "
                                        f"last line as \"#### <number>\"."}]


# a minus right before the number or its "$" (not one between two numbers: "5-3", "5 - 3"), "$" (SVAMP writes
# "$ 4"), a number with thousands commas or none, a decimal part, "/b"; a comma not followed by three digits
# separates numbers ("1,2,3", "12,34").
# The lookbehind is ASCII only: a number right after Chinese text ("答案是42") is still a number.
NUMBER = re.compile(r"(?<![A-Za-z0-9_./])(?P<sign>[-−])?(?:\$\s?)?"
                    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?:\s?/\s?(?P<den>\d+))?(?!\d)")
ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|答案(?:是|为|：|:))\s*:?", re.IGNORECASE)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _normal(m):
    """The number of a NUMBER match as a plain string: "-1234.50", "3/4"."""
    sign = "-" if m.group("sign") else ""
    text = sign + m.group("num").replace(",", "")
    return f"{text}/{m.group('den')}" if m.group("den") else text


CLAUSE_END = re.compile(r"\n|\.(?:\s|$)")


def _answer_from(text, start):
    """The answer stated from text[start:] on: in the rest of its clause (up to a line end or a full stop), the
    number after the last "=" ("the answer is 43 + 21 = 64") or else the first number; past the clause, the next
    number; None when there is none."""
    end = CLAUSE_END.search(text, start)
    clause = text[start:end.start() if end else len(text)]
    m = NUMBER.search(clause, clause.rfind("=") + 1) or NUMBER.search(text, start)
    return _normal(m) if m else None


def _number_after(text, marker):
    """The answer stated after the last `marker` in text (_answer_from), or None."""
    at = text.rfind(marker)
    return None if at < 0 else _answer_from(text, at + len(marker))


def extract_answer(text):
    """The final answer of a completion as a plain number string, or None when it holds no number (rules: the
    module docstring)."""
    if "####" in text:
        found = _number_after(text, "####")
        if found is not None:
            return found
    boxed = BOXED.findall(text)
    if boxed:
        m = NUMBER.search(boxed[-1])
        if m:
            return _normal(m)
    said = list(ANSWER_IS.finditer(text))
    if said:
        found = _answer_from(text, said[-1].end())
        if found is not None:
            return found
    numbers = list(NUMBER.finditer(text))
    return _normal(numbers[-1]) if numbers else None


def to_number(text):
    """A Fraction for "1,234", "$5", "-2.50", "3/4" (the whole stripped text must be a number), else None."""
    if text is None:
        return None
    m = NUMBER.fullmatch(str(text).strip().rstrip("."))
    if not m:
        return None
    value = Fraction(_normal(m).split("/")[0])
    if m.group("den"):
        if int(m.group("den")) == 0:
            return None
        value /= int(m.group("den"))
    return value


def answers_match(predicted, gold):
    """Whether a predicted answer equals the gold one: as exact rationals when both are numbers ("1,000" ==
    "1000.0"), else as stripped strings. None (no answer found) matches nothing."""
    if predicted is None:
        return False
    p, g = to_number(predicted), to_number(gold)
    if p is not None and g is not None:
        return p == g
    return str(predicted).strip() == str(gold).strip()


# ---------------------------------------------------------------------------------------------------- rewards
# TRL-style batched rewards: fn(prompts, completions, answers) -> one float per completion.

FINAL_LINE = re.compile(r"####\s?" + NUMBER.pattern + r"\s*\.?")


def _check_batch(prompts, completions, answers):
    if not len(prompts) == len(completions) == len(answers):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(answers)} answers: "
                         f"a reward needs one of each per sample")


def gsm8k_answer(prompts, completions, answers):
    """1.0 where the completion's final answer (extract_answer) matches the gold answer, else 0.0."""
    _check_batch(prompts, completions, answers)
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers)]


def format_reward(prompts, completions, answers):
    """1.0 where the completion ends as prompt_messages asks: its last non-empty line is "#### <number>" (a final
    full stop allowed), else 0.0. Registered as "format"."""
    _check_batch(prompts, completions, answers)
    last = [next((line.strip() for line in reversed(c.splitlines()) if line.strip()), "") for c in completions]
    return [float(FINAL_LINE.fullmatch(line) is not None) for line in last]


def length_penalty(prompts, completions, answers, soft_chars=600, max_chars=1200):
    """0 up to soft_chars characters, falling linearly to -1 at max_chars and beyond: DAPO's soft overlong
    punishment, in characters since a reward sees text (English runs ~4 characters a token: 150 to 300 tokens).
    functools.partial(length_penalty, soft_chars=..., max_chars=...) for other limits."""
    _check_batch(prompts, completions, answers)
    if not 0 <= soft_chars < max_chars:
        raise ValueError(f"length_penalty: need 0 <= soft_chars ({soft_chars}) < max_chars ({max_chars})")
    return [0.0 - min(max(len(c) - soft_chars, 0) / (max_chars - soft_chars), 1.0) for c in completions]


REWARDS = {"gsm8k_answer": gsm8k_answer, "format": format_reward, "length_penalty": length_penalty}


def load_reward(name):
    """A reward function: a name in REWARDS, or "module:function" (a module on the import path, or a .py file:
    "my_rewards.py:exact"). Anything that cannot be found stops with a line naming it."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"reward {name!r}: expected one of {', '.join(REWARDS)} or module:function")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise SystemExit(f"reward {name!r}: file {module_name} not found")
            spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"reward {name!r}: cannot import {module_name}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SystemExit(f"reward {name!r}: {module_name} has no function {attr}")
    return fn


# ---------------------------------------------------------------------------------------------------- evaluation

def pass_at_k(n, c, k):
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021, numerically stable
    form): 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority(answers):
    """The most common answer, numbers grouped by value ("5" with "5.0"); ties go to the one seen first; None when
    no answer was found."""
    keys = [to_number(a) if to_number(a) is not None else a for a in answers if a is not None]
    if not keys:
        return None
    counts = Counter(keys)
    best = max(counts.values())
    key = next(k for k in keys if counts[k] == best)
    return next(a for a in answers if a is not None and (to_number(a) if to_number(a) is not None else a) == key)


def score(records, k):
    """Metrics of per-problem records ({"gold", "extracted": n answers}): pass@1 is the mean share of correct
    samples (with one greedy sample, plain accuracy); with k > 1, maj@k (the majority of the first k samples is
    correct) and pass@k (unbiased from n samples, plain when n == k)."""
    correct = [[answers_match(a, r["gold"]) for a in r["extracted"]] for r in records]
    metrics = {"problems": len(records), "samples": len(records[0]["extracted"]),
               "pass@1": sum(sum(c) / len(c) for c in correct) / len(records)}
    if k > 1:
        metrics[f"maj@{k}"] = sum(answers_match(majority(r["extracted"][:k]), r["gold"])
                                  for r in records) / len(records)
        metrics[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(records)
    return metrics


def check_settings(k, samples, temperature):
    """Stop, naming the keys, on eval.py --task=gsm8k settings that cannot work (before a model is loaded)."""
    if k < 1 or samples < 0 or 0 < samples < k:
        raise SystemExit(f"--k={k} --samples={samples}: need k >= 1 and samples 0 (= k) or >= k")
    if k > 1 and temperature == 0:
        raise SystemExit(f"--k={k} samples completions: it needs --temperature > 0 (k=1 is greedy)")


def evaluate(model, tok, problems, k=1, temperature=0.0, top_p=1.0, max_new_tokens=256, batch_size=16, seed=0,
             n=0, top_k=0):
    """Answer each problem in the model's chat template (prompt_messages) and score the extracted answers.
    k=1 with temperature 0 is greedy pass@1; k > 1 samples n (default k) completions per problem at temperature /
    top_p / top_k (0 = off) and adds maj@k and pass@k (score). The completions run through engine.Engine,
    batch_size at a time (a finished one frees its slot for the next), stopping at the tokenizer's stop ids; each
    sample has its own generator seeded from (seed, problem, sample), so the samples do not depend on batch_size.
    Returns the metrics with "format" (the share of completions whose last line is "#### <n>"), "seconds", "tokens"
    (generated), and "records": per problem its question, gold answer, completions and extracted answers, in the
    problems' order."""
    n = n or k
    if k < 1 or n < k:
        raise ValueError(f"need k >= 1 and n >= k samples per problem, got k={k} n={n}")
    if n > 1 and temperature == 0:
        raise ValueError(f"{n} samples per problem need temperature > 0: greedy decoding gives one answer")
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [tok.encode(inference.render_chat(tok, prompt_messages(p["question"]))) for p in problems]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    max_new_tokens = inference.fit_reply(len(prompts[longest]), max_new_tokens, model.config.max_seq_len,
                                         f"problem {longest + 1}: its prompt", "completions")
    rows = [(i, s) for i in range(len(problems)) for s in range(n)]
    t0 = time.time()
    with Engine(model, parallel=batch_size, max_queue=len(rows), stop_ids=tok.stop_ids,
                max_len=len(prompts[longest]) + max_new_tokens) as engine, \
            tqdm(total=len(rows), desc="gsm8k", unit="answer", disable=len(rows) <= batch_size) as bar:
        requests = [engine.submit(prompts[i], SamplingParams(
            max_new_tokens, temperature, top_k, top_p, seed=random.Random(f"{seed}:{i}:{s}").getrandbits(63)),
            on_event=lambda request, token, *_: token is None and bar.update()) for i, s in rows]
        for request in requests:
            request.wait()
    failed = next((r for r in requests if r.finish_reason == "error"), None)
    if failed is not None:
        raise failed.error
    stop, completions, tokens = set(tok.stop_ids), [[None] * n for _ in problems], 0
    for (i, s), request in zip(rows, requests):
        ids = request.tokens[:-1] if request.tokens and request.tokens[-1] in stop else request.tokens
        tokens += len(ids)
        completions[i][s] = tok.decode(ids, skip_special=True)
    records = [{"question": p["question"], "gold": p["answer"], "completions": c,
                "extracted": [extract_answer(x) for x in c]} for p, c in zip(problems, completions)]
    metrics = score(records, k)
    flat = [x for c in completions for x in c]
    metrics["format"] = sum(format_reward([""] * len(flat), flat, [""] * len(flat))) / len(flat)
    metrics.update(seconds=time.time() - t0, tokens=tokens, records=records)
    return metrics
