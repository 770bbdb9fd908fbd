"""Evaluate a checkpoint: perplexity, multiple-choice benchmarks and generation (to chat with one: chat.py).

    python eval.py --ckpt=out/run/pretrain/hf --task=ppl --data=out/run/data            # val.bin of a data folder
    python eval.py --ckpt=model.gguf --task=hellaswag --data=../shared/data/eval_en/hellaswag --limit=1000
    python eval.py --ckpt=out/run/pretrain/hf --task=arc --data=../shared/data/eval_en/arc_easy --out=arc.json
    python eval.py --ckpt=model.gguf --task=ceval --data=../shared/data/eval_zh/ceval --subject=logic --shots=5
    python eval.py --ckpt=out/run/pretrain/hf --task=generate --data=prompts.txt --max_new_tokens=64
    python eval.py --ckpt=out/long/base/hf --task=ppl --data=out/run/data --lengths=256,512,1024 --rope_scaling=yarn --extend_to=1024
    python eval.py --ckpt=out/long/yarn/hf --task=passkey --lengths=256,512,1024 --depths=0,0.5,1
    python eval.py --ckpt=model.gguf --task=gsm8k --data=../shared/data/math_en/svamp --limit=200 --out=svamp.json

--ckpt takes anything inference.load_model reads: our checkpoint folders (transformers folders: config.json +
model.safetensors + tokenizer; pretrain.py writes one to <out_dir>/hf), transformers Llama/Phi folders, .gguf files,
the quantized folders quant_model.py writes, and LoRA adapter folders (PEFT format; loaded onto the base their
adapter_config.json names, or --lora_base, and merged: see lora.py).

Tasks
  ppl        mean loss and perplexity of a token stream, read by data.token_stream: a data folder of data_process.py
             (its val.bin; --split=train for the other) or a .bin inside one, refused when made with another
             tokenizer than the checkpoint's; or text files (.txt: one document per line; .jsonl {"text"}), EOS
             after each document. Windows of block_size tokens advance by stride; each window scores only the
             tokens the previous one did not (the "perplexity of fixed-length models" method of the transformers
             docs), so every token is scored once, with up to block_size - stride tokens of context carried over.
             --lengths=256,512,1024: one row per window length (perplexity against context length).
             bpb: bits per byte, loss * tokens / (bytes * ln 2) with the UTF-8 bytes of the text (a data folder's
             meta.json records them per split; text files are counted as read), which compares across tokenizers;
             not with --limit.
  passkey    retrieval of a random number (1..50000) hidden in filler text (the prompt of LongLoRA's
             passkey_retrivial.py, after Landmark Attention), --trials prompts per --lengths (prompt tokens) and
             --depths (where the key's line sits: 0 = first, 1 = last); a hit is a greedy continuation that starts
             with the key. Needs no --data. A length whose KV cache and prefill attention masks would not fit the
             free memory is refused before any generation, with the longest that fits (passkey.py).
  hellaswag  HellaSwag jsonl(.gz) with lm-evaluation-harness's preprocessing (see load_hellaswag).
  arc        ARC jsonl {question: {stem, choices: [{text, label}]}, answerKey}; context "Question: ...\\nAnswer:".
  mmlu       csv folders <data>/<split>/<subject>_<split>.csv (MMLU headerless; C-Eval/CMMLU with a header, CMMLU's
  ceval      files named <subject>.csv); --subject filters (comma-separated), --shots=k puts the first k questions of
  cmmlu      the subject's dev split in front. Default split: mmlu/cmmlu test, ceval val (its test has no labels).
  mc         any multiple choice as jsonl, one item per line:
               {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0}
             optional "sep" (default " "): the text between context and every choice, as lm-evaluation-harness's
             target_delimiter (use "" for Chinese, where words are not separated by spaces).
  generate   one completion per prompt: a .txt file (one prompt per line) or jsonl {"prompt"}; --chat=True wraps
             each prompt in the checkpoint's chat template. A completion stops at the model's context.
  gsm8k      generative math (math_tasks.py: data layouts, the prompt, answer extraction): GSM8K jsonl, SVAMP's
             json, {question, answer} JSON Lines or "addition[:digits=3,n=500]". pass@1 is greedy; --k=8 samples
             --samples (default k) completions per problem and adds maj@k and pass@k; --out keeps every completion.

--rope_scaling=linear|dynamic|yarn with --extend_to=N stretches the checkpoint's context before evaluating (no
fine-tuning; checkpoint.extend_context); a checkpoint extended and fine-tuned already carries its scaling.

Multiple-choice scoring (lm-evaluation-harness's loglikelihood requests): for each choice the text context + sep +
choice is tokenized as a whole, and the tokens from the context's own token count on are the choice's tokens (so a
token merged across the boundary counts for the choice). The model scores them in one forward pass; batches are
right-padded, which cannot change a causal model's scores of the real tokens (beyond float rounding: in bf16 a
different batch can flip close calls, so figures meant to match a reference use --dtype=float32). Three accuracies:
  acc        argmax of the summed log-probability of the choice tokens
  acc_token  argmax of the mean log-probability per choice token (summed / number of choice tokens)
  acc_norm   argmax of the summed log-probability / len(choice) in characters: lm-evaluation-harness's acc_norm
             (the GPT-3 paper's per-character normalisation; a character is a byte for ASCII text)
For mmlu/ceval/cmmlu the choices are the letters A-D: --method=loglik scores " A".." D" after the prompt as above
(lm-evaluation-harness), --method=first_token compares the next-token logits of the four letters right after the
prompt: "A".."D" after "答案：" as C-Eval's own code (no space in the shots either), " A".." D" after "Answer:" as
Hendrycks' MMLU code. Both report acc only (one token per choice: the normalisations change nothing).
"""
import csv
import glob
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import configurator
import data as datalayer
import inference
import math_tasks
import passkey
import readers
from inference import gather_logprobs, pad_right, perplexity

# ---------------------------------------------------------------------------------------------------- config
ckpt = ""             # checkpoint: folder, .gguf, quantized folder or LoRA adapter folder (PEFT format)
lora_base = ""        # a LoRA adapter's base checkpoint ("" = the adapter config's base_model_name_or_path)
task = "hellaswag"    # ppl | passkey | hellaswag | arc | mmlu | ceval | cmmlu | mc | generate | gsm8k
data = ""             # the task's data: file or folder (see the docstring)
split = ""            # "" = the task's usual split (ppl val, hellaswag val, arc test, mmlu/cmmlu test, ceval val)
subject = ""          # mmlu/ceval/cmmlu: comma-separated subjects ("" = all)
shots = 0             # mmlu/ceval/cmmlu: k-shot examples, the first k of the subject's dev split
method = "loglik"     # mmlu/ceval/cmmlu: loglik (lm-evaluation-harness) or first_token (C-Eval's code)
limit = 0             # only the first N items (ppl: the first N tokens); 0 = all
batch_size = 16       # sequences per forward pass
bos = False           # prepend BOS to every scored sequence (lm-evaluation-harness adds none unless the
                      # tokenizer does; turn it on for models trained with a BOS before each document)
block_size = 0        # ppl: window length in tokens (0 = the model's max_seq_len)
stride = 0            # ppl: tokens a window advances (0 = block_size: disjoint windows)
lengths = ()          # ppl: window lengths, one row each (instead of block_size); passkey: prompt lengths in tokens
                      # (required). Comma-separated: --lengths=256,512,1024 or one length
depths = (0, 0.25, 0.5, 0.75, 1)  # passkey: where the key sits, as fractions of the filler
trials = 10           # passkey: prompts (keys) per length and depth
rope_scaling = ""     # linear | dynamic | yarn: stretch the checkpoint's context to extend_to before evaluating
extend_to = 0
max_new_tokens = 256  # generate, gsm8k (fewer where the prompt leaves less of the model's context)
temperature = 0.7     # generate, gsm8k with k > 1: 0 = greedy
top_k = 50            # generate, gsm8k with k > 1: 0 = off
top_p = 0.9           # generate, gsm8k with k > 1: 1.0 = off
k = 1                 # gsm8k: 1 = greedy pass@1; k > 1 adds maj@k and pass@k from sampled completions
samples = 0           # gsm8k: completions per problem with k > 1 (0 = k; more makes pass@k the unbiased estimate)
no_repeat_ngram_size = 0  # generate: never repeat an n-gram of this size (0 = off; small models loop without it)
chat = True           # generate: wrap prompts in the chat template
system = ""           # generate: system prompt ("" = the template's default, if any)
seed = 1337
device = ""           # "" = cuda when available, else cpu
dtype = "float32"     # float32: figures equal to an fp32 reference; bfloat16: ~2.3x faster on CPUs with AMX, but
                      # moves HellaSwag acc_norm by up to ~0.5-0.8 points (rounding flips close calls); auto:
                      # bfloat16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
out = ""              # write the results as JSON here
# -----------------------------------------------------------------------------------------------------------

MC_TASKS = ("hellaswag", "arc", "mc", "mmlu", "ceval", "cmmlu")
LETTER_TASKS = ("mmlu", "ceval", "cmmlu")
LETTERS = "ABCD"
# C-Eval's subject names as its prompt uses them (SJTU-LIT/ceval subject_mapping.json)
CEVAL_SUBJECTS = dict(kv.split("=") for kv in """
computer_network=计算机网络 operating_system=操作系统 computer_architecture=计算机组成 college_programming=大学编程
college_physics=大学物理 college_chemistry=大学化学 advanced_mathematics=高等数学 probability_and_statistics=概率统计
discrete_mathematics=离散数学 electrical_engineer=注册电气工程师 metrology_engineer=注册计量师
high_school_mathematics=高中数学 high_school_physics=高中物理 high_school_chemistry=高中化学 high_school_biology=高中生物
middle_school_mathematics=初中数学 middle_school_biology=初中生物 middle_school_physics=初中物理
middle_school_chemistry=初中化学 veterinary_medicine=兽医学 college_economics=大学经济学 business_administration=工商管理
marxism=马克思主义基本原理 mao_zedong_thought=毛泽东思想和中国特色社会主义理论体系概论 education_science=教育学
teacher_qualification=教师资格 high_school_politics=高中政治 high_school_geography=高中地理 middle_school_politics=初中政治
middle_school_geography=初中地理 modern_chinese_history=近代史纲要 ideological_and_moral_cultivation=思想道德修养与法律基础
logic=逻辑学 law=法学 chinese_language_and_literature=中国语言文学 art_studies=艺术学 professional_tour_guide=导游资格
legal_professional=法律职业资格 high_school_chinese=高中语文 high_school_history=高中历史 middle_school_history=初中历史
civil_servant=公务员 sports_science=体育学 plant_protection=植物保护 basic_medicine=基础医学 clinical_medicine=临床医学
urban_and_rural_planner=注册城乡规划师 accountant=注册会计师 fire_engineer=注册消防工程师
environmental_impact_assessment_engineer=环境影响评价工程师 tax_accountant=税务师 physician=医师资格""".split())


# ---------------------------------------------------------------------------------------------------- scoring

@dataclass
class MCItem:
    context: str
    choices: list      # the choice texts (what acc_norm measures); each is scored as sep + choice
    label: int
    sep: str = " "
    subject: str = ""


def encode_pair(tok, context, continuation, bos=False):
    """(tokens, n_context): context + continuation tokenized as one text; the continuation is everything from the
    context's own token count on. As lm-evaluation-harness does, trailing spaces of the context move to the
    continuation ("Answer: " + "A" scores like "Answer:" + " A"), and an empty context becomes BOS (else EOS)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    prefix = [tok.bos_id] if bos else []
    if not context and not prefix:
        prefix = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    n_context = len(prefix) + len(tok.encode(context))
    whole = prefix + tok.encode(context + continuation)
    return whole, n_context


@torch.inference_mode()
def score_continuations(model, requests, batch_size, desc="score"):
    """[(logprob_sum, n_tokens)] of tokens[n_context:] given the tokens before them, for (tokens, n_context)
    requests. Sequences longer than the model's window lose tokens on the left (as lm-evaluation-harness);
    one-token continuations of the same context (the letters of MMLU/C-Eval) share one forward pass; inputs go
    longest first so a batch holds similar lengths."""
    max_len, device = model.config.max_seq_len, inference.device_of(model)
    rows, inputs, members, shared = [], [], [], {}
    for k, (tokens, n_context) in enumerate(requests):
        n_cont = len(tokens) - n_context
        if n_cont < 1:
            raise ValueError(f"request {k}: the choice encodes to no tokens")
        if n_cont > max_len:
            raise ValueError(f"request {k}: the choice has {n_cont} tokens, more than max_seq_len={max_len}")
        tokens = tokens[-(max_len + 1):]
        rows.append((tokens, n_cont))
        key = tuple(tokens[:-1]) if n_cont == 1 else k
        if key not in shared:
            shared[key] = len(inputs)
            inputs.append(tokens[:-1])
            members.append([])
        members[shared[key]].append(k)
    order = sorted(range(len(inputs)), key=lambda u: -len(inputs[u]))
    sums = torch.zeros(len(rows), dtype=torch.float64)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None):
        batch = order[b:b + batch_size]
        idx, lengths = pad_right([inputs[u] for u in batch], device)
        batch_rows, positions, targets, owners = [], [], [], []
        for r, u in enumerate(batch):
            for k in members[u]:
                tokens, n_cont = rows[k]
                batch_rows += [r] * n_cont
                positions += range(lengths[r] - n_cont, lengths[r])
                targets += tokens[-n_cont:]
                owners += [k] * n_cont
        logits, _ = model(idx)
        lp = gather_logprobs(logits, batch_rows, positions, targets).double().cpu()
        sums.index_add_(0, torch.tensor(owners), lp)
    return [(sums[k].item(), n_cont) for k, (_, n_cont) in enumerate(rows)]


def score_items(model, tok, items, batch_size, bos=False, desc="score"):
    """Per item, [(logprob_sum, n_tokens)] of each choice."""
    requests = [encode_pair(tok, it.context, it.sep + c, bos) for it in items for c in it.choices]
    flat = score_continuations(model, requests, batch_size, desc)
    scores, k = [], 0
    for it in items:
        scores.append(flat[k:k + len(it.choices)])
        k += len(it.choices)
    return scores


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as np.argmax


def mc_metrics(items, scores):
    """acc / acc_token / acc_norm (see the docstring) of items given score_items' scores, and the predictions."""
    hits = {"acc": [], "acc_token": [], "acc_norm": []}
    for it, sc in zip(items, scores):
        summed = [s for s, _ in sc]
        hits["acc"].append(_argmax(summed) == it.label)
        hits["acc_token"].append(_argmax([s / n for s, n in sc]) == it.label)
        hits["acc_norm"].append(_argmax([s / len(c) for s, c in zip(summed, it.choices)]) == it.label)
    return {name: sum(h) / len(h) for name, h in hits.items()}, hits


@torch.inference_mode()
def first_token_logits(model, tok, items, batch_size, bos=False, desc="score"):
    """Per item, the next-token logits of its choices right after the context (C-Eval's and the original MMLU
    code's method); a choice's id is the last of tok.encode(sep + choice), as C-Eval's code takes it."""
    max_len, device = model.config.max_seq_len, inference.device_of(model)
    prompts = [([tok.bos_id] if bos else []) + tok.encode(it.context) for it in items]
    prompts = [p[-max_len:] for p in prompts]
    choice_ids = [[tok.encode(it.sep + c)[-1] for c in it.choices] for it in items]
    order = sorted(range(len(items)), key=lambda k: -len(prompts[k]))
    results = [None] * len(items)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None):
        batch = order[b:b + batch_size]
        idx, lengths = pad_right([prompts[k] for k in batch], device)
        logits, _ = model(idx)
        for r, k in enumerate(batch):
            results[k] = logits[r, lengths[r] - 1, choice_ids[k]].float().tolist()
    return results


# ---------------------------------------------------------------------------------------------------- data

def pick_file(path, split):
    """path itself, or the one .jsonl(.gz) file in the folder whose name contains the split."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise SystemExit(f"data not found: {path!r}")
    files = sorted(f for ext in ("*.jsonl", "*.jsonl.gz") for f in glob.glob(os.path.join(path, ext)))
    matching = [f for f in files if split.lower() in os.path.basename(f).lower()]
    if len(matching) != 1:
        raise SystemExit(f"{path}: expected one data file for split {split!r}, found "
                         f"{[os.path.basename(f) for f in matching or files]}; pass --data=FILE or --split=...")
    return matching[0]


def _bad_record(where, expected, error):
    return SystemExit(f"{where}: {error!r}: expected {expected}")


def hellaswag_preprocess(text):
    """lm-evaluation-harness's HellaSwag text cleaning (WikiHow's [title]/[step] markers, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(ctx):
    """lm-evaluation-harness's context is activity_label + ": " + ctx_a + " " + ctx_b.capitalize(). The llama.cpp
    text form (ctx = activity_label + ": " + ctx_a + " " + ctx_b, preprocessed) lost the split; ctx_b is the
    unfinished sentence at the end (ActivityNet items: "...on a roof. he"), so capitalize a trailing fragment
    that starts lowercase. On the validation set this finds 3236 items; the other 6806 end in punctuation."""
    m = re.search(r"[.!?] ([^.!?]*)$", ctx) or re.search(r": ([^.!?]*)$", ctx)
    if m and m.group(1)[:1].islower():
        return ctx[:m.start(1)] + m.group(1).capitalize()
    return ctx


def load_hellaswag(path, split="val"):
    """HellaSwag as rowanz/hellaswag's jsonl {activity_label, ctx_a, ctx_b, endings, label} or the llama.cpp/klosax
    form {ctx, endings, label} (../shared/data/eval_en/hellaswag), both as lm-evaluation-harness prepares them:
    context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices = preprocessed
    endings, each scored after a space."""
    items = []
    for where, d in readers.read_jsonl(pick_file(path, split)):
        try:
            if "ctx_a" in d:
                ctx = d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
            else:
                ctx = _capitalize_ctx_b(hellaswag_preprocess(d["ctx"]))
            endings = [hellaswag_preprocess(e) for e in _strings(d["endings"], "endings")]
            item = MCItem(hellaswag_preprocess(ctx), endings, _index(d["label"], "label"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _bad_record(where, "HellaSwag {ctx, endings, label} or {activity_label, ctx_a, ctx_b, ...}", e)
        items.append(_checked(item, where))
    return items


def load_arc(path, split="test"):
    """ARC jsonl as AI2 ships it {question: {stem, choices: [{text, label}]}, answerKey} or as the HF dataset
    {question, choices: {text: [], label: []}, answerKey}; lm-evaluation-harness's "Question: ...\\nAnswer:"."""
    items = []
    for where, d in readers.read_jsonl(pick_file(path, split)):
        try:
            q = d["question"]
            stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, d["choices"])
            if isinstance(choices, dict):
                texts, labels = _strings(choices["text"], "choices.text"), _strings(choices["label"], "choices.label")
                if len(texts) != len(labels):
                    raise ValueError(f"{len(texts)} choices.text but {len(labels)} choices.label")
                choices = [{"text": t, "label": l} for t, l in zip(texts, labels)]
            elif not isinstance(choices, list):
                raise TypeError(f"choices must be a list, got {type(choices).__name__}")
            labels = [str(c["label"]) for c in choices]
            item = MCItem(f"Question: {stem}\nAnswer:", [c["text"] for c in choices], labels.index(str(d["answerKey"])))
        except (KeyError, TypeError, ValueError) as e:
            raise _bad_record(where, "ARC {question: {stem, choices: [{text, label}]}, answerKey}", e)
        items.append(_checked(item, where))
    return items


def load_mc(path, split=""):
    """The generic jsonl {"context": str, "choices": [str], "label": int, "sep": optional str}."""
    items = []
    for where, d in readers.read_jsonl(pick_file(path, split)):
        try:
            if not isinstance(d["label"], int) or isinstance(d["label"], bool):
                raise TypeError(f"label must be an int (the index of the right choice), got {d['label']!r}")
            item = MCItem(d["context"], _strings(d["choices"], "choices"), d["label"], d.get("sep", " "))
        except (KeyError, TypeError) as e:
            raise _bad_record(where, '{"context": str, "choices": [str], "label": int}', e)
        items.append(_checked(item, where))
    return items


def _strings(value, key):
    """value when it is a list of strings; a string is refused, not split into one choice per character."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must be a list of strings, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _index(value, key):
    """An int, or the digits of one as a string (the HF datasets store HellaSwag's label as "0".."3")."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an int, got {value!r}")
    return value


def _checked(item, where):
    if not isinstance(item.context, str) or not isinstance(item.sep, str):
        raise SystemExit(f"{where}: context and sep must be strings, got {item.context!r} and {item.sep!r}")
    if len(item.choices) < 2:
        raise SystemExit(f"{where}: needs at least 2 choices, got {len(item.choices)}")
    if not 0 <= item.label < len(item.choices):
        raise SystemExit(f"{where}: label {item.label} is out of range for {len(item.choices)} choices")
    if any(not c for c in item.choices):
        raise SystemExit(f"{where}: a choice is empty")
    return item


def read_mc_csv(path):
    """[(where, question, [A, B, C, D], answer letter or None)] of an MMLU (headerless question,A,B,C,D,answer),
    C-Eval (id,question,A,B,C,D[,answer[,explanation]]) or CMMLU (,Question,A,B,C,D,Answer) csv."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise SystemExit(f"{path}: empty csv")
    head = [c.strip().lower() for c in rows[0][1]]
    if "question" in head and all(letter.lower() in head for letter in LETTERS):
        cols = [head.index(name) for name in ("question", "a", "b", "c", "d")]
        answer_col = head.index("answer") if "answer" in head else None
        rows = rows[1:]
    else:
        cols, answer_col = [0, 1, 2, 3, 4], 5
    out = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if len(row) <= max(cols + [answer_col or 0]):
            raise SystemExit(f"{where}: {len(row)} columns; expected question, A, B, C, D" +
                             (", answer" if answer_col is not None else ""))
        answer = row[answer_col].strip().upper() if answer_col is not None else None
        if answer is not None and answer not in LETTERS:
            raise SystemExit(f"{where}: answer {row[answer_col]!r} is not one of A, B, C, D")
        out.append((where, row[cols[0]], [row[c] for c in cols[1:]], answer))
    return out


def _subject_files(folder, split):
    """{subject: csv path} of <folder>/<subject>_<split>.csv (MMLU, C-Eval) or <folder>/<subject>.csv (CMMLU)."""
    files = sorted(glob.glob(os.path.join(folder, "*.csv")))
    return {re.sub(f"(_{split})?\\.csv$", "", os.path.basename(f)): f for f in files}


def letter_header(task, subject):
    if task == "mmlu":
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    if task == "ceval":
        return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, subject)}考试的单项选择题，请选出其中的正确答案。\n\n"
    return f"以下是关于{subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"


def letter_question(task, question, options):
    cue = "Answer:" if task == "mmlu" else "答案："
    return question.strip() + "".join(f"\n{l}. {o}" for l, o in zip(LETTERS, options)) + "\n" + cue


def load_letter_task(task, path, split="", subjects="", shots=0, sep=" "):
    """mmlu/ceval/cmmlu items: header + the first `shots` dev questions with their answers + the question, whose
    choices are the letters A-D scored after sep (" " as lm-evaluation-harness; "" for C-Eval-style first_token)."""
    split = split or ("val" if task == "ceval" else "test")
    files = _subject_files(os.path.join(path, split), split)
    if not files:
        raise SystemExit(f"{path}/{split}: no csv files (expected <subject>_{split}.csv or <subject>.csv)")
    if subjects:
        wanted = [s.strip() for s in subjects.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in files]
        if unknown:
            raise SystemExit(f"unknown subject(s) {unknown} in {path}/{split}; known: {', '.join(files)}")
        files = {s: files[s] for s in wanted}
    dev_files = _subject_files(os.path.join(path, "dev"), "dev") if shots else {}
    items = []
    for subject, file in files.items():
        demo = ""
        if shots:
            if subject not in dev_files:
                raise SystemExit(f"--shots={shots}: no dev split for {subject} in {path}/dev")
            dev = read_mc_csv(dev_files[subject])
            if len(dev) < shots or any(a is None for *_, a in dev[:shots]):
                raise SystemExit(f"{dev_files[subject]}: needs {shots} answered questions for --shots={shots}")
            demo = "".join(letter_question(task, q, o) + sep + a + "\n\n" for _, q, o, a in dev[:shots])
        for where, q, options, answer in read_mc_csv(file):
            if answer is None:
                raise SystemExit(f"{file}: no answer column (C-Eval's test labels are not public: use --split=val)")
            context = letter_header(task, subject) + demo + letter_question(task, q, options)
            items.append(MCItem(context, list(LETTERS), LETTERS.index(answer), sep, subject))
    return items


def load_items(task, path, split="", subjects="", shots=0, method="loglik"):
    if task in LETTER_TASKS:  # first_token: "答案：A" as C-Eval's code, "Answer: A" as Hendrycks' MMLU code
        sep = "" if method == "first_token" and task != "mmlu" else " "
        return load_letter_task(task, path, split, subjects, shots, sep)
    if shots:
        raise SystemExit(f"--shots applies to mmlu/ceval/cmmlu, not {task}")
    loader = {"hellaswag": load_hellaswag, "arc": load_arc, "mc": load_mc}[task]
    return loader(path, split or {"hellaswag": "val", "arc": "test", "mc": ""}[task])


# ---------------------------------------------------------------------------------------------------- tasks

def run_mc(model, tok, items, task, method="loglik", batch=16, add_bos=False):
    """{"all": metrics, subject: metrics...} where metrics = {n, acc, ...}."""
    if task in LETTER_TASKS and method == "first_token":
        logits = first_token_logits(model, tok, items, batch, add_bos)
        hits = {"acc": [_argmax(lg) == it.label for lg, it in zip(logits, items)]}
    else:
        _, hits = mc_metrics(items, score_items(model, tok, items, batch, add_bos))
    groups = {"all": range(len(items))}
    if task in LETTER_TASKS and len({it.subject for it in items}) > 1:
        for k, it in enumerate(items):
            groups.setdefault(it.subject, []).append(k)
    return {g: {"n": len(ks), **{m: sum(h[k] for k in ks) / len(ks) for m, h in hits.items()}}
            for g, ks in groups.items()}


def check_lengths(values):
    if not values or any(not isinstance(v, int) or v < 2 for v in values):
        raise SystemExit(f"--lengths={','.join(map(str, values))}: expected comma-separated lengths of at least 2 "
                         f"tokens")
    return list(values)


def print_table(rows, columns):
    """rows: {name: {column: value}}; accuracies print as percentages."""
    def fmt(column, v):
        if isinstance(v, float):
            return f"{100 * v:.2f}" if column.startswith("acc") else f"{v:.4f}"
        return str(v)
    table = [["", *columns]] + [[name, *(fmt(c, r.get(c, "")) for c in columns)] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns) + 1)]
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def check_settings():
    """Stop at start-up, naming the key, on settings that cannot work (before a model is loaded)."""
    if task == "chat":
        raise SystemExit("eval.py has no chat task: chat with a checkpoint with python chat.py --ckpt=...")
    if task not in ("ppl", "passkey", "generate", "gsm8k", *MC_TASKS):
        raise SystemExit(f"unknown --task={task!r}: ppl, passkey, {', '.join(MC_TASKS)}, generate or gsm8k")
    if method not in ("loglik", "first_token"):
        raise SystemExit(f"unknown --method={method!r}: loglik or first_token")
    if method == "first_token" and task not in LETTER_TASKS:
        raise SystemExit(f"--method=first_token applies to {', '.join(LETTER_TASKS)}, not {task}")
    if not ckpt:
        raise SystemExit("--ckpt=PATH is required")
    if task == "passkey":
        check_lengths(lengths)
        if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
                             for d in depths):
            raise SystemExit(f"--depths={','.join(map(str, depths))}: expected comma-separated fractions in [0, 1]")
        if trials < 1:
            raise SystemExit(f"--trials={trials}: must be at least 1")
    elif not data:
        raise SystemExit(f"--task={task} needs --data=PATH (see python eval.py's docstring for each task's data)")
    for key in ("batch_size",):
        if globals()[key] < 1:
            raise SystemExit(f"--{key}={globals()[key]}: must be at least 1")
    for key in ("limit", "shots", "block_size", "stride"):
        if globals()[key] < 0:
            raise SystemExit(f"--{key}={globals()[key]}: must be >= 0 (0 = {'all' if key == 'limit' else 'default'})")
    if task in ("generate", "gsm8k"):
        inference.check_sampling(max_new_tokens, temperature, top_k, top_p, 1.0)
    if task == "gsm8k":
        math_tasks.check_settings(k, samples, temperature)
    if out and (os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out)))):
        raise SystemExit(f"--out={out}: not a file in an existing folder")


def main():
    cfg = configurator.apply(globals(), sys.argv[1:])
    check_settings()
    torch.manual_seed(seed)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype, why = inference.resolve_dtype(dtype, dev)
    print(f"dtype={run_dtype} ({why})", flush=True)
    if task in MC_TASKS:  # the data is checked before the model is loaded
        items = load_items(task, data, split, subject, shots, method)
        items = items[:limit] if limit else items
    elif task == "generate":
        prompts = load_prompts(data)[:limit or None]
    elif task == "gsm8k":
        problems = math_tasks.load_problems(data, limit)
    model, tok = inference.load_model(ckpt, dev, run_dtype, lora_base)
    checkpoint.extend_context(model, rope_scaling, extend_to)
    if bos and tok.bos_id is None:
        raise SystemExit(f"--bos=True: the tokenizer of {ckpt} has no BOS token")
    t0 = time.time()
    if task == "ppl":
        tokens = datalayer.token_stream(data, tok, split or "val")
        tokens = tokens[:limit] if limit else tokens
        windows = check_lengths(lengths) if lengths else [block_size or model.config.max_seq_len]
        if stride > min(windows):
            raise SystemExit(f"--stride={stride} is larger than the window of {min(windows)} tokens: tokens would "
                             f"go unscored")
        if len(tokens) < 2:
            raise SystemExit(f"{data}: {len(tokens)} token(s); perplexity needs at least 2")
        summary = {str(w) if lengths else "ppl": perplexity(model, tokens, w, stride or w, batch_size) for w in windows}
        n_bytes = None if limit else datalayer.stream_bytes(data, split or "val")
        for row in summary.values() if n_bytes else ():
            row["bpb"] = datalayer.bits_per_byte(row["loss"], row["tokens"], n_bytes)
        if not n_bytes:
            print("no bits per byte: " + ("--limit scores a part of the text whose bytes are not counted" if limit else
                                          f"{data}: its meta.json records no bytes (data made before they were)"))
        print_table(summary, ["tokens", "loss", "ppl"] + ["bpb"] * bool(n_bytes))
    elif task == "passkey":
        passkey.check_memory(model, lengths, min(batch_size, trials))
        summary = passkey.run(model, tok, lengths, depths, trials, batch_size, seed, bos)
        print_table(summary, [f"acc@{d:g}" for d in depths] + ["acc_mean"])
    elif task == "generate":
        summary = []
        for number, p in enumerate(prompts, 1):
            text = inference.render_chat(tok, [{"role": "user", "content": p}], system) if chat else p
            print(f"### {p}")
            try:
                completion = inference.stream_reply(model, tok, text, max_new_tokens, temperature, top_k, top_p,
                                                    on_text=lambda s: print(s, end="", flush=True),
                                                    no_repeat_ngram_size=no_repeat_ngram_size)
            except ValueError as e:
                raise SystemExit(f"{data}: prompt {number}: {e}")
            print("\n")
            summary.append({"prompt": p, "completion": completion})
    elif task == "gsm8k":
        try:
            summary = math_tasks.evaluate(model, tok, problems, k, temperature if k > 1 else 0.0, top_p,
                                          max_new_tokens, batch_size, seed, samples, top_k)
        except ValueError as e:  # a prompt that leaves no room in the model's context
            raise SystemExit(f"{data}: {e}")
        print_table({data: summary}, ["problems", *(c for c in summary if "@" in c), "format", "tokens", "seconds"])
    else:
        summary = run_mc(model, tok, items, task, method, batch_size, bos)
        elapsed = time.time() - t0
        summary["all"]["items_per_s"] = len(items) / elapsed
        print(f"{task}: {len(items)} items in {elapsed:.1f}s ({len(items) / elapsed:.2f} items/s)")
        print_table(summary, ["n", "acc"] if task in LETTER_TASKS else ["n", "acc", "acc_token", "acc_norm"])
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"ckpt": ckpt, "task": task, "config": cfg, "results": summary,
                       "seconds": time.time() - t0}, f, ensure_ascii=False, indent=2)
        print(f"wrote {out}")


def load_prompts(path):
    """Prompts of a .txt (one per line) or .jsonl {"prompt"} file."""
    prompts = list(readers.iter_texts(path, text_field="prompt"))
    if not prompts:
        raise SystemExit(f"{path}: no prompts (one per line of a .txt, or .jsonl {{\"prompt\": ...}})")
    return prompts


if __name__ == "__main__":
    main()
