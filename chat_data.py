"""Chat records for SFT and DPO: any supported layout -> one conversation form -> masked token streams.

The layouts read (alpaca, sharegpt, messages; prompt/chosen/rejected, sharegpt with chosen/rejected, hh-rlhf
transcripts) and the on-disk form written are described in data_process.py's docstring; data_process.py reads the
files and calls prepare_chat(). Trainers read the result back with data.load_sft() / data.load_dpo().
Every template goes through the same jinja path (tokenizer.apply_chat_template), so the data dir's tokenizer carries
the template its data was rendered with and inference renders prompts the same way.
"""
import collections
import itertools
import os
import re

import numpy as np
from tqdm import tqdm

import data
import workers
from clean import strip_control
from readers import parse_rename
from tokenizer import CHATML_TEMPLATE, IM_END, IM_START, QA_TEMPLATE, ChatTemplateError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
TEMPLATES = {"auto": None, "chatml": CHATML_TEMPLATE, "qa": QA_TEMPLATE}  # auto: the tokenizer's own


def _message(m):
    if not isinstance(m, dict):
        raise ValueError(f"a message must be an object, got {type(m).__name__}")
    role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
    if role not in _ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(_ROLES)})")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")
    return {"role": _ROLES[role], "content": strip_control(content)}


def _turns(value, role):
    """A string (one message of `role`) or a message list."""
    if isinstance(value, str):
        return [_message({"role": role, "content": value})]
    if not isinstance(value, list):
        raise ValueError(f"expected a string or a message list, got {type(value).__name__}")
    return [_message(m) for m in value]


def _with_system(rec, msgs):
    return ([_message({"role": "system", "content": rec["system"]})] if rec.get("system") else []) + msgs


def _alpaca(rec):
    if not isinstance(rec.get("instruction"), str):
        raise ValueError("alpaca record needs a string 'instruction'")
    msgs = []
    for pair in rec.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"alpaca 'history' items must be [user, assistant] pairs, got {pair!r:.60}")
        msgs += [_message({"role": "user", "content": pair[0]}), _message({"role": "assistant", "content": pair[1]})]
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return _with_system(rec, msgs + [_message({"role": "user", "content": prompt})])


def _hh_transcript(text):
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if text.lstrip("\n").startswith(("Human:", "Assistant:"))
                           else text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    return [_message({"role": parts[i].lower(), "content": parts[i + 1].strip()}) for i in range(1, len(parts), 2)]


def validate(msgs, ends_with):
    """Roles: optional system first, then user/assistant alternating from user; contents non-empty; the last one is
    `ends_with`. Raises ValueError saying what is wrong."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise ValueError("no messages")
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}) is empty")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"roles must alternate user/assistant after an optional system message, "
                             f"got {[m['role'] for m in msgs]}")
    if body[-1]["role"] != ends_with:
        raise ValueError("the conversation must end with " + ("an assistant reply" if ends_with == "assistant"
                                                              else "a user message"))
    return msgs


def to_conversation(rec, counts=None):
    """An SFT record of any supported layout -> validated [{"role", "content"}] ending with the assistant.
    Trailing user turns without a reply are dropped (counted)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    if isinstance(rec.get("messages"), list):
        msgs = [_message(m) for m in rec["messages"]]
    elif isinstance(rec.get("conversations"), list):
        msgs = _with_system(rec, [_message(m) for m in rec["conversations"]])
    elif "instruction" in rec and "output" in rec:
        msgs = _alpaca(rec) + [_message({"role": "assistant", "content": rec["output"]})]
    elif "prompt" in rec and "completion" in rec:  # TRL's prompt-completion layout
        msgs = _with_system(rec, _turns(rec["prompt"], "user") + _turns(rec["completion"], "assistant"))
    else:
        raise ValueError(f"not a chat record: expected messages, conversations, instruction/output or "
                         f"prompt/completion (record has: {', '.join(list(rec)[:12])}; --rename maps other keys)")
    while len(msgs) > 1 and msgs[-1]["role"] == "user":
        msgs.pop()
        if counts is not None:
            counts["trailing_user_turns_dropped"] += 1
    return validate(msgs, "assistant")


def _reply(value):
    if isinstance(value, str):
        return strip_control(value)
    if isinstance(value, dict):
        m = _message(value)
    elif isinstance(value, list) and value:  # a message list: the prompt's turns then the reply
        m = _message(value[-1])
    else:
        raise ValueError(f"chosen/rejected must be a string, a message or a message list, got {value!r:.40}")
    if m["role"] != "assistant":
        raise ValueError(f"chosen/rejected must be an assistant reply, got role {m['role']}")
    return m["content"]


def to_preference(rec):
    """A preference record of any supported layout -> (prompt messages ending with user, chosen, rejected)."""
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise ValueError("a preference record needs 'chosen' and 'rejected'"
                         + (f" (record has: {', '.join(list(rec)[:12])})" if isinstance(rec, dict) else ""))
    ch, rj = rec["chosen"], rec["rejected"]
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = _with_system(rec, [_message({"role": "user", "content": p})] if isinstance(p, str)
                              else [_message(m) for m in p])
    elif isinstance(rec.get("conversations"), list) or isinstance(rec.get("messages"), list):
        prompt = _with_system(rec, [_message(m) for m in rec.get("conversations", rec.get("messages"))])
    elif "instruction" in rec:
        prompt = _alpaca(rec)
    else:  # full transcripts (hh-rlhf strings or message lists): the prompt is their shared beginning
        a = _hh_transcript(ch) if isinstance(ch, str) else [_message(m) for m in ch]
        b = _hh_transcript(rj) if isinstance(rj, str) else [_message(m) for m in rj]
        if a[:-1] != b[:-1]:
            raise ValueError("chosen and rejected transcripts differ before their last reply")
        prompt, ch, rj = a[:-1], a[-1:], b[-1:]
    chosen, rejected = _reply(ch), _reply(rj)
    validate(prompt, "user")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ValueError(f"{name} reply is empty")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return prompt, chosen, rejected


class TemplateError(ValueError):
    pass


def chat_tokenizer(tok, template, where="tokenizer"):
    """(the tokenizer that renders and encodes the records for `template`, {added special token: id}). chatml and qa
    replace the tokenizer's chat template, auto keeps it; ChatML's markers are added at new ids when the vocabulary
    lacks them. Every marker the template writes must encode as its single id."""
    if template not in TEMPLATES:
        raise SystemExit(f"template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    if TEMPLATES[template] is not None:
        tok = tok.with_chat_template(TEMPLATES[template])
    markers = [IM_START, IM_END] if tok.chat_template == CHATML_TEMPLATE else []
    added = {}
    missing = [m for m in markers if m not in tok.special_tokens]
    if missing:
        tok = tok.add_special_tokens(missing)
        added = {m: tok.special_tokens[m] for m in missing}
    if tok.chat_template == QA_TEMPLATE:
        eos = {i: s for s, i in tok.special_tokens.items()}.get(tok.eos_id)
        if eos is None:
            raise SystemExit(f"{where}: --template=qa ends every answer with EOS, and this tokenizer has no EOS token")
        markers = [eos]
    for m in markers:
        if tok.encode(m) != [tok.special_tokens[m]]:
            raise SystemExit(f"{where}: {m!r} does not encode as its single id {tok.special_tokens[m]} "
                             f"(got {tok.encode(m)}), so the template's markers would be plain text")
    return tok, added


def _render_pieces(tok, msgs):
    """Rendered chat text as (piece, is_assistant) pieces: each assistant piece is what the template adds for that
    reply after the generation prompt (the reply and its end-of-turn marker)."""
    pieces, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True)
        after = tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError("the chat template does not render conversations prefix by prefix; cannot mask it")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    return pieces + [(full[len(done):], False)]


def _encode_sft(convs):
    """Worker: conversations -> [(ids, mask)] with mask 1 on the assistant pieces."""
    tok, out = workers.state["tok"], []
    for msgs in convs:
        pieces = [p for p in _render_pieces(tok, msgs) if p[0]]
        if not any(p[1] for p in pieces):
            raise TemplateError("the chat template renders no assistant text; cannot mask it")
        ids = tok.encode_batch([p[0] for p in pieces])
        out.append((np.array([i for x in ids for i in x], dtype=np.int64),
                    np.concatenate([np.full(len(x), p[1], dtype=np.uint8) for x, p in zip(ids, pieces)])))
    return out


def _encode_dpo(records):
    """Worker: (prompt, chosen, rejected) -> token id arrays; the replies are what the template adds after the
    generation prompt for each of them."""
    tok, out = workers.state["tok"], []
    for prompt, chosen, rejected in records:
        head = tok.apply_chat_template(prompt, add_generation_prompt=True)
        texts = [head]
        for reply in (chosen, rejected):
            full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                           add_generation_prompt=False)
            if not full.startswith(head):
                raise TemplateError("the chat template does not render the prompt as a prefix of the conversation")
            texts.append(full[len(head):])
        out.append([np.array(x, dtype=np.int64) for x in tok.encode_batch(texts)])
    return out


def _template_errors_exit(encoded, cfg):
    try:
        yield from encoded
    except TemplateError as e:  # raised in a worker: the chat template itself is unusable, not one record
        raise SystemExit(f"{cfg['tokenizer'] or 'tokenizer'}: {e}")
    except ChatTemplateError as e:  # the template failed to render a record; the message names its file
        raise SystemExit(str(e)) from None


def prepare_chat(cfg, tok, tok_source, records, sources, issues):
    """--format=sft|dpo: convert, validate, tokenize and write the records (layouts in the module docstring)."""
    out, sft, max_len = cfg["out_dir"], cfg["format"] == "sft", cfg["max_len"]
    renames, base_checksum = parse_rename(cfg["rename"]), tok.checksum()
    tok, added = chat_tokenizer(tok, cfg["template"], cfg["tokenizer"] or "tokenizer")
    os.makedirs(out, exist_ok=True)
    if isinstance(tok_source, str):  # workers that load the tokenizer again load this one (template, added tokens)
        tok.save_pretrained(out)
        tok_source = out
    else:
        tok_source = tok
    dt, counts, splits = data.choose_dtype(tok.vocab_size, cfg["dtype"]), collections.Counter(), []

    def converted():
        for rec, path, line in records:
            counts["records_read"] += 1
            if renames and isinstance(rec, dict):
                rec = {renames.get(k, k): v for k, v in rec.items()}
            try:
                item = to_conversation(rec, counts) if sft else to_preference(rec)
            except ValueError as e:
                issues(path, line, str(e))
                continue
            split = rec.get("split")
            if split not in ("train", "val"):  # greedy: val keeps val_fraction of the records, deterministically
                split = "val" if counts["val"] < cfg["val_fraction"] * (counts["train"] + counts["val"]) else "train"
            counts[split] += 1
            splits.append(split)
            yield item

    names = [f"{s}{x}" for s in ("train", "val") for x in ((".bin", "_mask.bin") if sft else (".bin",))]
    tokens, index = {"train": 0, "val": 0}, {"train": [], "val": []}
    results = workers.parallel_map(_encode_sft if sft else _encode_dpo, workers.batches(converted(), max_items=64),
                                   workers.count(cfg["num_workers"]), (tok_source, cfg))
    with data.SplitWriter(out, names) as writer:
        bar = None
        for k, enc in enumerate(_template_errors_exit(itertools.chain.from_iterable(results), cfg)):
            bar = tqdm(desc="records", unit="rec") if bar is None else bar  # after the fork: no tqdm thread there
            bar.update(1)
            split = splits[k]
            o = tokens[split]
            if sft:
                ids, mask = enc
                if len(ids) > max_len:
                    ids, mask = ids[:max_len], mask[:max_len]
                    counts["truncated"] += 1
                    if not mask.any():  # every assistant token was past max_len: nothing left to train on
                        counts["dropped_lost_all_supervised_tokens"] += 1
                        continue
                writer.write(f"{split}_mask.bin", mask, np.uint8)
                index[split].append(o + len(ids))
            else:
                p, c, r = enc
                if len(p) + max(len(c), len(r)) > max_len:  # keep the prompt's end, then cut the replies
                    counts["truncated"] += 1
                    p = p[-min(len(p), max_len // 2):]
                    c, r = c[:max_len - len(p)], r[:max_len - len(p)]
                ids = np.concatenate([p, c, r])
                index[split].append((o, o + len(p), o + len(p) + len(c), o + len(ids)))
            data.check_ids(ids, tok.vocab_size)
            writer.write(f"{split}.bin", ids, dt)
            tokens[split] += len(ids)
        if bar is not None:
            bar.close()
        if counts["records_read"] == 0:
            raise SystemExit(f"{cfg['input'] or 'input'}: empty input, no records were read")
        if not index["train"]:
            raise SystemExit(f"{cfg['input'] or 'input'}: no valid {cfg['format']} records for the train split")
    for split, rows in index.items():  # sft: n + 1 record offsets; dpo: (n, 4) prompt/chosen/rejected/end offsets
        rows = np.array([0] + rows if sft else rows, dtype=np.int64)
        np.save(os.path.join(out, f"{split}_idx.npy"), rows if sft else rows.reshape(-1, 4))
    counts.update(skipped_bad_records=issues.count, kept=len(index["train"]) + len(index["val"]))
    grown = {"base_tokenizer_sha256": base_checksum, "added_tokens": added} if added else {}
    return data.write_meta(out, tok, dt, cfg, {
        "train_records": len(index["train"]), "val_records": len(index["val"]), "train_tokens": tokens["train"],
        "val_tokens": tokens["val"], "max_len": max_len, **grown, "sources": list(sources),
        "counts": dict(sorted(counts.items())), "skipped_examples": issues.examples})

