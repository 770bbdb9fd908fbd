"""eval.py --task=passkey: retrieval of a random number hidden in filler text (the prompt of LongLoRA's
passkey_retrivial.py, after Landmark Attention), and the memory check that refuses lengths whose KV cache and prefill
attention masks would not fit before any generation."""
import random
import re

import torch


INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def prompt(tok, key, length, depth, bos=False):
    """Token ids of the longest passkey prompt within `length` tokens: the intro, filler sentences with the key's
    line after a fraction `depth` of them, the question."""
    info = f"The pass key is {key}. Remember it. {key} is the pass key."

    def encode(n):
        k = round(depth * n)
        text = " ".join([INTRO, *[FILLER] * k, info, *[FILLER] * (n - k), QUESTION])
        return ([tok.bos_id] if bos else []) + tok.encode(text)

    n = max(0, (length - len(encode(0))) // len(tok.encode(" " + FILLER)))
    ids = encode(n)
    while len(ids) > length and n > 0:  # merges across sentences can make the estimate a little long
        n -= 1
        ids = encode(n)
    if len(ids) > length:
        raise SystemExit(f"--lengths: a passkey prompt takes {len(ids)} tokens even without filler; {length} is too "
                         f"short")
    return ids


def run(model, tok, lengths, depths, trials, batch_size, seed, bos=False):
    """{length: {"acc@depth": fraction of hits, ..., "acc_mean": ...}} over `trials` random keys per cell."""
    rng = random.Random(seed)
    results = {}
    for length in lengths:
        row = {}
        for depth in depths:
            keys = [rng.randint(1, 50000) for _ in range(trials)]
            hits = 0
            for b in range(0, trials, batch_size):
                batch = keys[b:b + batch_size]
                prompts = [prompt(tok, key, length, depth, bos) for key in batch]
                n_new = max(len(tok.encode(f" {key}.")) for key in batch)
                out = model.generate(prompts, max_new_tokens=n_new, temperature=0)
                for key, new in zip(batch, out[:, -n_new:].tolist()):
                    hits += re.match(rf"\s*{key}(?!\d)", tok.decode(new)) is not None
            row[f"acc@{depth:g}"] = hits / trials
            print(f"passkey: {length} tokens, depth {depth:g}: {hits}/{trials}", flush=True)
        row["acc_mean"] = sum(row.values()) / len(row)
        results[str(length)] = row
    return results


def free_memory(device):
    """Bytes free for new tensors on `device`: CUDA's free memory, else MemAvailable of /proc/meminfo (None where
    there is none: no check then)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory(model, rows, length):
    """{part: bytes} that generating for `rows` prompts of `length` tokens needs beyond the weights (model.generate;
    within ~15% of the peak measured on CPU): the KV cache; the prefill's attention masks, rows x T x T each (boolean,
    its negation and the additive one in the cache's dtype), which grow with the square of the length; one layer's
    activations."""
    c, p = model.config, next(model.parameters())
    cache = 4 if p.device.type == "cpu" else p.element_size()  # Transformer.setup_cache: an fp32 cache on CPU
    T = length + 16  # and the key's few tokens
    return {"KV cache": 2 * c.n_layers * rows * c.n_kv_heads * c.head_dim * T * cache,
            "attention mask": rows * T * T * (cache + 2),
            "activations": rows * T * (4 * c.dim + 3 * c.hidden_dim) * p.element_size()}


def check_memory(model, lengths, rows):
    """Stop before generating when the longest passkey prompt would need more than 90% of the memory free on the
    model's device (memory); lengths past max_seq_len are allowed: they measure the context extension."""
    device, length = next(model.parameters()).device, max(lengths)
    free, need = free_memory(device), memory(model, rows, length)
    if free is None or sum(need.values()) <= 0.9 * free:
        return

    def longest(b):  # the longest length that fits with b rows
        lo, hi = 0, length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(memory(model, b, mid).values()) <= 0.9 * free else (lo, mid - 1)
        return lo

    parts = ", ".join(f"{name} {v / 2**30:.1f}" for name, v in need.items())
    raise SystemExit(f"--lengths={length}: a passkey batch of {rows} prompt(s) of {length:,} tokens needs about "
                     f"{sum(need.values()) / 2**30:.1f} GiB on {device} ({parts}) but {free / 2**30:.1f} GiB is free "
                     f"(90% of it may be planned on): lengths up to {longest(rows):,} fit at --batch_size={rows}, "
                     f"{longest(1):,} at --batch_size=1")
