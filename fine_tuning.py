"""Supervised fine-tuning (SFT) - full, LoRA or QLoRA - of our models and imported ones, on trainer.py's loop.

    python data_process.py --format=sft --tokenizer=out/run/tokenizer --out_dir=out/run/sft_data
    python fine_tuning.py --init_from=out/run/pretrain/hf --data_dir=out/run/sft_data --out_dir=out/run/sft
    python fine_tuning.py config/sft_riddles.py --init_from=$GGUF --data_dir=data/riddles         # LoRA r=32
    python fine_tuning.py config/sft_riddles.py --init_from=$GGUF --data_dir=data/riddles --method=qlora
    python fine_tuning.py ... --init_from=resume          # continue the newest checkpoint in out_dir

Data: an SFT directory of `data_process.py --format=sft` (ChatML, the model's own template or ##Question/##Answer,
chosen there with --template); only the assistant turns and their end tokens carry labels. An epoch's records go
in a seeded order, padded to the longest of each micro-batch (pad id, labels -100), or with packing=True several
records share a row of max_len tokens (positions restart at each record, no attention across records). The loss
is the mean over every supervised token of an optimizer step, whatever the accumulation or the number of
processes (trainer.py). Tokens the data's tokenizer added to the model's (ChatML's markers on a tokenizer without
them) grow the embeddings to a multiple of 64, and their rows train (with LoRA, embed and lm_head are then trained
in full).

What lands in out_dir: checkpoints, metrics.jsonl and loss.png as in pretraining; hf/ (the model; with LoRA/QLoRA
the adapter merged in merge_dtype) and, with LoRA/QLoRA, adapter/ (PEFT format, loads with peft.PeftModel and
eval.py --ckpt). At each evaluation a few held-out prompts are answered greedily, so the answers can be watched
as they change.
"""
import math
import os
import sys

import numpy as np
import torch

import configurator
import convert
import inference
import lora
import trainer
from data import open_data_dir
from metrics import log
from model import resize_embeddings

# -- the training loop's settings: every field of trainer.TrainConfig is a key of this script; SFT's defaults follow
globals().update(vars(trainer.TrainConfig()))
out_dir = "out/sft"
init_from = ""              # the model to tune: a folder (our hf/, a transformers folder) or a .gguf; or resume
data_dir = "data/sft"       # data_process.py --format=sft
method = "full"             # full | lora | qlora (LoRA on a frozen NF4 base through bitsandbytes, bf16 compute)
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "all"        # all, or module names: ours/transformers' (q_proj,v_proj) or Phi's (Wqkv,out_proj,fc1,fc2)
use_rslora = False          # scale by alpha / sqrt(rank) instead of alpha / rank
trainable = ""              # LoRA: modules also trained in full, e.g. "embed,lm_head" (PEFT's modules_to_save)
merge_dtype = "bfloat16"    # LoRA/QLoRA: dtype of the merged model in hf/ (bfloat16 | float32)
epochs = 1.0                # with max_iters=0: optimizer steps = epochs * steps in one pass over the train split
max_iters = 0               # > 0: this many steps instead
max_len = 0                 # tokens per record (per row when packing); 0: the model's max_seq_len; longer are cut
packing = False
eval_interval = 0           # 0: twice an epoch
eval_iters = 0              # 0: the whole val split
sample_prompts = 3          # held-out prompts answered at each evaluation (0: none)
sample_tokens = 48          # ... with at most this many new tokens
batch_size = 8
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0


class SFTBatches:
    """Micro-batches of (input ids, labels[, document ids]) for step and micro index, a pure function of both (so
    resume and every parallel backend see the same data): units (records, or packed rows of records) in a seeded
    order per epoch, padded on the right."""

    def __init__(self, records, max_len, batch_size, pad_id, seed, packing):
        self.records, self.max_len, self.batch_size, self.pad_id, self.seed = records, max_len, batch_size, pad_id, seed
        self.packing = packing
        self.kept, self.cut, self.dropped = self._fit(records, max_len)
        self.units = self._pack(self.kept, max_len) if packing else [[i] for i in self.kept]
        self._order = {}

    @staticmethod
    def _fit(records, max_len):
        """Records whose first max_len + 1 tokens hold a supervised label (those cut to nothing are left out)."""
        kept, cut, dropped = [], 0, 0
        starts, mask = records.offsets, records.mask
        for i in range(len(records)):
            a, b = int(starts[i]), int(starts[i + 1])
            if b - a > max_len + 1:
                cut += 1
            if b - a < 2 or not mask[a + 1:min(b, a + max_len + 1)].any():
                dropped += 1
            else:
                kept.append(i)
        return kept, cut, dropped

    def _pack(self, kept, max_len):
        """Rows of consecutive records (in a fixed shuffled order) holding at most max_len input tokens each."""
        order = np.random.default_rng([self.seed, 2]).permutation(kept)
        rows, row, used = [], [], 0
        for i in order.tolist():
            n = min(int(self.records.offsets[i + 1] - self.records.offsets[i]), self.max_len + 1) - 1
            if row and used + n > max_len:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        return rows + ([row] if row else [])

    def __len__(self):
        return len(self.units)

    def _sample(self, i):
        ids, labels = self.records[i]
        ids, labels = ids[:self.max_len + 1], labels[:self.max_len + 1]
        return ids[:-1], labels[1:]  # next-token pairs inside the record

    def _rows(self, units):
        rows = []
        for unit in units:
            pairs = [self._sample(i) for i in unit]
            x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
            doc = np.concatenate([np.full(len(p[0]), j) for j, p in enumerate(pairs)])
            rows.append((x, y, doc))
        width = max(len(r[0]) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        doc = torch.full((len(rows), width), len(self.units), dtype=torch.long)  # padding: one more document
        for r, (a, b, d) in enumerate(rows):
            x[r, :len(a)], y[r, :len(b)], doc[r, :len(d)] = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(d)
        return (x, y, doc) if self.packing else (x, y)

    def train_batch(self, step, micro, grad_accum):
        n = len(self.units)
        first = (step * grad_accum + micro) * self.batch_size
        units = []
        for p in range(first, first + self.batch_size):
            epoch = p // n
            if epoch not in self._order:
                self._order = {epoch: np.random.default_rng([self.seed, 3, epoch]).permutation(n)}
            units.append(self.units[self._order[epoch][p % n]])
        return self._rows(units)

    def val_batch(self, i):
        units = self.units[i * self.batch_size:(i + 1) * self.batch_size]
        return self._rows(units or self.units[:1])


def prompt_of(records, i):
    """The tokens of record i before its first supervised one: the conversation up to the first reply."""
    ids, labels = records[i]
    first = int(np.argmax(labels != -100))
    return ids[:first].tolist(), ids[first:][labels[first:] != -100].tolist()


def answer_prompts(tok, prompts, n_tokens):
    """on_eval: greedy answers to held-out prompts, printed beside the reference answer."""
    def run(t):
        for ids, reference in prompts:
            text = tok.decode(ids)
            reply = inference.stream_reply(t.raw_model, tok, text, max_new_tokens=n_tokens, temperature=0)
            log(f"  prompt: {text[-200:]!r}\n  reply:  {reply!r}\n  reference: {tok.decode(reference, skip_special=True)!r}")
    return run


def lora_export(tok, dtype):
    """export for LoRA/QLoRA: the adapter in PEFT's format in out_dir/adapter, the merged model in out_dir/hf."""
    def run(t):
        if not t.master:
            return
        model = t.raw_model.cpu()
        lora.save_adapter(model, os.path.join(t.c.out_dir, "adapter"), base=t.model_source)
        tok.save_pretrained(os.path.join(t.c.out_dir, "adapter"))
        lora.merge_lora(model, dtype=getattr(torch, dtype))
        convert.save_pretrained(model, os.path.join(t.c.out_dir, "hf"))
        tok.save_pretrained(os.path.join(t.c.out_dir, "hf"))
        log(f"adapter: {t.c.out_dir}/adapter; merged model ({dtype}): {t.c.out_dir}/hf")
    return run


def check_settings():
    if method not in ("full", "lora", "qlora"):
        raise SystemExit(f"method={method!r}: expected full, lora or qlora")
    if merge_dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"merge_dtype={merge_dtype!r}: expected bfloat16 or float32")
    for key in ("max_len", "max_iters", "eval_interval", "eval_iters", "sample_prompts"):
        if globals()[key] < 0:
            raise SystemExit(f"{key}={globals()[key]}: must not be negative")
    if epochs <= 0 and max_iters == 0:
        raise SystemExit(f"epochs={epochs}: must be positive (or set max_iters)")
    if method != "full" and (lora_rank < 1 or lora_alpha <= 0 or not 0 <= lora_dropout < 1):
        raise SystemExit(f"lora_rank={lora_rank}, lora_alpha={lora_alpha}, lora_dropout={lora_dropout}: need rank "
                         f">= 1, alpha > 0, dropout in [0, 1)")
    if not init_from:
        raise SystemExit("--init_from=MODEL is required: a folder (e.g. out/run/pretrain/hf) or a .gguf, or resume")


def main():
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    check_settings()
    trainer.train_config({**cfg, "max_iters": 1, "eval_interval": 1, "eval_iters": 1})  # the rest, before any work
    model, model_tok = trainer.build_model(init_from, out_dir)
    data = open_data_dir(data_dir, "sft", tokenizer=model_tok)
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(data.tokenizer_dir) if data.tokenizer_dir else model_tok
    if tok is None:
        raise SystemExit(f"neither {data_dir} nor the model holds a tokenizer")
    added = data.meta.get("added_tokens") or {}
    if data.meta["vocab_size"] > model.config.vocab_size:
        new = resize_embeddings(model, data.meta["vocab_size"])
        log(f"embeddings resized to {new} rows for the tokens the data's tokenizer added: {', '.join(added)}")
    train_records, val_records = data.sft("train"), data.sft("val")
    length = max_len or model.config.max_seq_len
    if length > model.config.max_seq_len:
        raise SystemExit(f"max_len={length} exceeds the model's context of {model.config.max_seq_len}")
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    train = SFTBatches(train_records, length, batch_size, pad, cfg["seed"], packing)
    val = SFTBatches(val_records, length, batch_size, pad, cfg["seed"], packing) if len(val_records) else None
    log(f"data: {len(train.kept)} train records ({train.cut} cut to {length} tokens, {train.dropped} left out: no "
        f"supervised token within them) in {len(train)} {'rows' if packing else 'samples'}"
        + (f"; {len(val.kept)} val records" if val else "; no val split"))
    if not train.kept:
        raise SystemExit(f"{data_dir}: no train record keeps a supervised token within max_len={length}")
    if method != "full":
        extra = trainable or ("embed,lm_head" if added else "")
        lora.add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, use_rslora, trainable=extra,
                      quantize="nf4" if method == "qlora" else None)
    steps_per_epoch = math.ceil(len(train) / (batch_size * cfg["grad_accum"]))
    cfg.update(max_iters=max_iters or math.ceil(epochs * steps_per_epoch),
               eval_interval=eval_interval or max(1, steps_per_epoch // 2),
               eval_iters=eval_iters or (math.ceil(len(val) / batch_size) if val else 1))
    prompts = [prompt_of(val_records, i) for i in val.kept[:sample_prompts]] if val else []
    t = trainer.Trainer(cfg, model, lambda s, m: train.train_batch(s, m, cfg["grad_accum"]),
                        val.val_batch if val else None, tokenizer_dir=data.tokenizer_dir,
                        on_eval=answer_prompts(tok, prompts, sample_tokens) if prompts else None,
                        export=lora_export(tok, merge_dtype) if method != "full" else None)
    t.fit()


if __name__ == "__main__":
    main()
