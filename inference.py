"""Load any checkpoint this project reads, generate from it and score text with it: the one model loader, the one
generation path and the perplexity that eval.py, chat.py and quant_model.py share, and the one choice of the dtype
every script (and trainer.py) computes in.

    dtype, why = inference.resolve_dtype("auto", "cpu")        # ("float32", "auto: this CPU has no fast bf16 ...")
    model, tok = inference.load_model("out/run/pretrain/hf")   # or a .gguf, a quantized folder, a LoRA adapter
    prompt = inference.render_chat(tok, [{"role": "user", "content": "Hi"}], system="Be brief.")
    reply = inference.stream_reply(model, tok, prompt, max_new_tokens=64, on_text=print)
    inference.perplexity(model, tok.encode(text), block_size=model.config.max_seq_len)   # {"loss", "ppl", "tokens"}

A reply never runs past the model's context (config.max_seq_len): stream_reply shortens it, saying so, and refuses
a prompt that leaves no room at all.
"""
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import convert
import lora
import quant
from tokenizer import ChatTemplateError, Tokenizer, tokenizer_in

CPU_BF16_VARIABLE = "TINYLLM_CPU_BF16"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name, device):
    """(dtype, why) for a dtype setting (auto | float32 | bfloat16 | float16) on `device` (a torch.device, its
    name, or auto): the dtype's name and a few words on why, for the first line a script logs. auto chooses
    bfloat16 only where it is fast: a CUDA GPU with native bf16 (else float16), a CPU with AMX or AVX512-BF16; any
    other CPU gets float32, since there bf16 matmuls are emulated, ~60x slower than fp32 on an AVX2-only EPYC (never
    float16 on a CPU). The environment variable TINYLLM_CPU_BF16=1 (or 0) says the CPU has (or lacks) fast bf16 whatever it
    reports: to measure the other case on one machine."""
    if name not in DTYPES:
        raise SystemExit(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    if device == "auto":  # the trainers' device=auto
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise SystemExit(f"device={device!r}: {e}") from None
    if kind == "cpu" and name in ("auto", "bfloat16"):
        fast, why = _cpu_bf16()
        if name == "bfloat16":
            return name, "as set" if fast else f"as set, but {why}: float32 is many times faster here"
        return ("bfloat16" if fast else "float32"), f"auto: {why}"
    if name != "auto":
        return name, "as set"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "auto: the GPU has native bf16"
        return "float16", "auto: the GPU has no native bf16"
    return "float32", f"auto: float32 on {kind}"


def _cpu_bf16():
    """(fast, why): whether bf16 matmuls run natively on this CPU, and the reason."""
    forced = os.environ.get(CPU_BF16_VARIABLE)
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"{CPU_BF16_VARIABLE}={forced!r}: expected 1 (the CPU has fast bf16) or 0 (it has not), "
                             f"or leave it unset to ask the CPU")
        return forced == "1", f"{CPU_BF16_VARIABLE}={forced}"
    if _cpu_has("_is_amx_tile_supported", "amx_bf16"):
        return True, "the CPU has AMX"
    if _cpu_has("_is_avx512_bf16_supported", "avx512_bf16"):
        return True, "the CPU has AVX512-BF16"
    return False, "this CPU has no fast bf16 (no AMX or AVX512-BF16)"


def _cpu_has(torch_check, cpuinfo_flag):
    """torch's own check where this torch has it, else the flag in /proc/cpuinfo; False where neither answers."""
    check = getattr(torch.cpu, torch_check, None)
    if check is not None:
        return check()
    try:
        with open("/proc/cpuinfo") as f:
            return cpuinfo_flag in f.read().split()
    except OSError:
        return False


def load_model(ckpt, device="cpu", dtype=torch.float32, lora_base=None):
    """(model, tokenizer) in eval mode from our checkpoint folders (transformers folders: config.json +
    model.safetensors + tokenizer), transformers Llama/Phi folders, .gguf files, the quantized folders quant.py
    writes, or a LoRA adapter folder (PEFT format), which is loaded onto its base (lora_base, else the one its
    adapter_config.json names) and merged. dtype: a torch dtype or a dtype setting's name (resolve_dtype). A
    checkpoint that cannot be read stops with a message naming it."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise SystemExit(f"device={device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device={device!r}: this torch sees no CUDA GPU (use cpu)")
    if isinstance(dtype, str):  # a setting's name, "auto" included (resolve_dtype)
        dtype = getattr(torch, resolve_dtype(dtype, device)[0])
    ckpt = os.fspath(ckpt)
    if not os.path.exists(ckpt):
        raise SystemExit(f"checkpoint not found: {ckpt!r}")
    try:
        if os.path.isdir(ckpt) and os.path.isfile(os.path.join(ckpt, lora.ADAPTER_CONFIG)):
            model, base = lora.load(ckpt, base=lora_base, device=device, dtype=dtype, merge=True)
            tok = Tokenizer.from_pretrained(ckpt if tokenizer_in(ckpt) else base)
        else:
            if quant.read_quantization_config(ckpt) is not None:
                model = quant.load_quantized(ckpt, device)
            else:
                model = convert.from_pretrained(ckpt, device=device, dtype=dtype)
            tok = Tokenizer.from_pretrained(ckpt)
    except (ValueError, FileNotFoundError) as e:  # the loaders' messages name the file; a traceback adds nothing
        raise SystemExit(str(e)) from None
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings: they do not belong together")
    return model.eval(), tok


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    """Stop at start-up, naming the key, on generation settings that cannot work."""
    problems = [f"{key}={value} {need}" for key, value, bad, need in [
        ("max_new_tokens", max_new_tokens, max_new_tokens < 1, "must be at least 1"),
        ("temperature", temperature, temperature < 0, "must be >= 0 (0 = greedy)"),
        ("top_k", top_k, top_k < 0, "must be >= 0 (0 = off)"),
        ("top_p", top_p, not 0 < top_p <= 1, "must be in (0, 1] (1 = off)"),
        ("repetition_penalty", repetition_penalty, repetition_penalty <= 0, "must be > 0 (1 = off)")] if bad]
    if problems:
        raise SystemExit("; ".join(problems))


def render_chat(tok, messages, system=""):
    """The prompt text for the next assistant turn, by the tokenizer's chat template (one that fails stops the
    run with a line naming its file: chat.py, eval.py and rag.py cannot go on without it)."""
    if system:
        messages = [{"role": "system", "content": system}] + messages
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise SystemExit(str(e)) from None


def fit_history(tok, history, system, budget):
    """The most recent turns whose rendered prompt has at most `budget` tokens (the last user turn always stays;
    the caller reports when even that does not fit)."""
    history = list(history)
    while len(history) > 1 and len(tok.encode(render_chat(tok, history, system))) > budget:
        history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
    return history


def fit_reply(prompt_tokens, max_new_tokens, context, prompt="the prompt", reply="reply"):
    """max_new_tokens, lowered (with a note on stderr) to what the context leaves after the prompt; a ValueError when
    it leaves nothing. prompt and reply name them in the messages."""
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"{prompt} has {prompt_tokens} tokens, the model's whole context is {context}: "
                         f"no room for a reply")
    if max_new_tokens > room:
        print(f"({reply} limited to {room} tokens: {prompt}'s {prompt_tokens} and max_new_tokens={max_new_tokens} "
              f"would pass the model's context of {context})", file=sys.stderr)
    return min(max_new_tokens, room)


def stream_reply(model, tok, prompt, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9,
                 repetition_penalty=1.0, on_text=None, no_repeat_ngram_size=0):
    """Generate after the prompt text until a stop token, at most max_new_tokens and never past the model's context
    (shortened with a note on stderr; a prompt that fills the context is a ValueError). on_text(new_text) is called
    as text arrives (a multi-byte character is held back until it is complete). Returns the reply text without the
    stop token; Ctrl-C ends the reply early and keeps what came."""
    ids = tok.encode(prompt)
    max_new_tokens = fit_reply(len(ids), max_new_tokens, model.config.max_seq_len)
    new_ids, shown = [], [""]

    def on_token(step_ids):
        new_ids.append(step_ids[0])
        if on_text is not None:
            text = tok.decode(new_ids, skip_special=True)
            if not text.endswith("\ufffd") and text.startswith(shown[0]):
                on_text(text[len(shown[0]):])
                shown[0] = text

    try:
        model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k or None,
                       top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                       stop_ids=tok.stop_ids, callback=on_token)
    except KeyboardInterrupt:
        pass  # the reply so far stands
    return tok.decode([i for i in new_ids if i not in tok.stop_ids], skip_special=True)


# ----------------------------------------------------------------------------- scoring

def gather_logprobs(logits, rows, positions, targets, chunk=1024):
    """log p(target) in fp32 for each (row, position, target) triple of (B, T, vocab) logits. Only these
    positions are turned to fp32, a chunk at a time: a (B, T, vocab) fp32 copy would not fit for long windows."""
    out = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    rows, positions, targets = (torch.as_tensor(x, dtype=torch.long, device=logits.device)
                                for x in (rows, positions, targets))
    for s in range(0, len(out), chunk):
        lg = logits[rows[s:s + chunk], positions[s:s + chunk]].float()
        out[s:s + chunk] = lg.gather(1, targets[s:s + chunk, None]).squeeze(1) - lg.logsumexp(-1)
    return out


def pad_right(rows, device):
    """(B, T) long tensor of token lists padded on the right with 0, and the lengths."""
    lengths = [len(r) for r in rows]
    idx = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for r, row in enumerate(rows):
        idx[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    return idx.to(device), lengths


def device_of(model):
    """The device of a model's (first) parameters: where its inputs go."""
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, tokens, block_size, stride=None, batch_size=1):
    """dict(loss, ppl, tokens) of a 1-D token sequence: windows of block_size input tokens start every stride
    tokens; each scores the targets after the previous window's last one, so each token after the first is scored
    once and ppl = exp(mean loss). With block_size >= len(tokens) - 1 it is the whole-text perplexity."""
    if torch.is_tensor(tokens):
        tokens = tokens.long().flatten().cpu()
    else:  # a list or an array; np.array copies, since a memmap is read-only
        tokens = torch.from_numpy(np.array(tokens, dtype=np.int64)).flatten()
    n = len(tokens)
    stride = stride or block_size
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    windows, scored_to = [], 1  # (start, end, first scored target index); targets are tokens[start+1:end]
    for start in range(0, n - 1, stride):
        end = min(start + block_size + 1, n)
        windows.append((start, end, scored_to))
        scored_to = end
        if end == n:
            break
    device, total, count = device_of(model), 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc="ppl", unit="batch", disable=len(windows) < 2):
        batch = windows[b:b + batch_size]
        idx, _ = pad_right([tokens[s:e - 1].tolist() for s, e, _ in batch], device)
        rows, positions, targets = [], [], []
        for r, (s, e, first) in enumerate(batch):  # input position t - s - 1 predicts token t
            rows += [r] * (e - first)
            positions += range(first - s - 1, e - s - 1)
            targets += tokens[first:e].tolist()
        logits, _ = model(idx)
        total -= gather_logprobs(logits, rows, positions, targets).sum().item()
        count += len(targets)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
