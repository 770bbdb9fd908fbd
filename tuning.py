"""What the fine-tuning scripts share (fine_tuning.py for SFT, dpo.py for DPO): their settings beyond the training
loop's, loading the model with its data (embeddings grown for added tokens), LoRA/QLoRA adapters, a longer context
(RoPE scaling, S²-Attn), batches that are a pure function of (step, micro), held-out answers at each evaluation, and
the LoRA export. pretrain.py takes the adapter and long-context settings from here too (continued pretraining).
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

import convert
import inference
import lora
import checkpoint
from data import open_data_dir, read_meta
from metrics import log
from model import resize_embeddings


@dataclass
class TuningConfig:
    init_from: str = ""          # the model to tune: a folder (hf/, a transformers folder, a training run's out_dir
                                 # or ckpt/step_N) or a .gguf; or resume
    method: str = "full"         # full | lora | qlora (LoRA on a frozen NF4 base through bitsandbytes, bf16 compute)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "all"    # all, or module names: ours/transformers' (q_proj,v_proj) or Phi's (Wqkv,out_proj,...)
    use_rslora: bool = False     # scale by alpha / sqrt(rank) instead of alpha / rank
    trainable: str = ""          # LoRA: modules also trained in full, e.g. "embed,lm_head" (PEFT's modules_to_save)
    merge_dtype: str = "bfloat16"  # LoRA/QLoRA: dtype of the merged model in hf/ (bfloat16 | float32)
    epochs: float = 1.0          # with max_iters=0: optimizer steps = epochs * steps in one pass over the train split
    max_iters: int = 0           # > 0: this many steps instead
    max_len: int = 0             # tokens per record (per row when packing); 0: the model's max_seq_len
    eval_interval: int = 0       # 0: twice an epoch
    eval_iters: int = 0          # 0: the whole val split
    sample_prompts: int = 3      # held-out prompts answered at each evaluation (0: none)
    sample_tokens: int = 48      # ... with at most this many new tokens
    rope_scaling: str = ""       # extend the model's context: linear | dynamic | yarn, to extend_to tokens
    extend_to: int = 0           # (checkpoint.extend_context; the scaling is saved in the model's config)
    s2_attn_groups: int = 0      # > 1: train with LongLoRA's shifted sparse attention, this many groups per
                                 # sequence (LongLoRA: 4); evaluation and the saved model attend in full


# the settings pretrain.py shares with the fine-tuning scripts (continued pretraining at a longer context, LoRA)
ADAPTER_KEYS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora", "trainable",
                "merge_dtype")
LONG_CONTEXT_KEYS = ("rope_scaling", "extend_to", "s2_attn_groups")


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
        untied = model.config.tie_embeddings and "lm_head" in lora.lora_layers(model)
        lora.merge_lora(model, dtype=getattr(torch, dtype))
        convert.save_pretrained(model, os.path.join(t.c.out_dir, "hf"))
        tok.save_pretrained(os.path.join(t.c.out_dir, "hf"))
        note = "; its lm_head is untied from the embedding (the adapter changed the output only)" if untied else ""
        log(f"adapter: {t.c.out_dir}/adapter; merged model ({dtype}): {t.c.out_dir}/hf{note}")
    return run


def check_adapter_settings(cfg):
    """The ADAPTER_KEYS and LONG_CONTEXT_KEYS of a resolved config, before any work."""
    if cfg["method"] not in ("full", "lora", "qlora"):
        raise SystemExit(f"method={cfg['method']!r}: expected full, lora or qlora")
    if cfg["merge_dtype"] not in ("bfloat16", "float32"):
        raise SystemExit(f"merge_dtype={cfg['merge_dtype']!r}: expected bfloat16 or float32")
    rank, alpha, dropout = cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]
    if cfg["method"] != "full" and (rank < 1 or alpha <= 0 or not 0 <= dropout < 1):
        raise SystemExit(f"lora_rank={rank}, lora_alpha={alpha}, lora_dropout={dropout}: need rank >= 1, alpha > 0, "
                         f"dropout in [0, 1)")
    if cfg["s2_attn_groups"] < 0:
        raise SystemExit(f"s2_attn_groups={cfg['s2_attn_groups']}: must not be negative (0: full attention)")
    if cfg["s2_attn_groups"] > 1 and cfg.get("packing"):
        raise SystemExit("s2_attn_groups with packing=True: S²-Attn's groups would cut across the packed records")
    if bool(cfg["rope_scaling"]) != bool(cfg["extend_to"]):
        raise SystemExit(f"rope_scaling={cfg['rope_scaling']!r}, extend_to={cfg['extend_to']}: set both (or neither)")


def check_settings(cfg):
    """The fine-tuning keys of a resolved config (this script's, or dpo.py's which shares them), before any work."""
    check_adapter_settings(cfg)
    for key in ("max_len", "max_iters", "eval_interval", "eval_iters", "sample_prompts"):
        if cfg[key] < 0:
            raise SystemExit(f"{key}={cfg[key]}: must not be negative")
    if cfg["epochs"] <= 0 and cfg["max_iters"] == 0:
        raise SystemExit(f"epochs={cfg['epochs']}: must be positive (or set max_iters)")
    if not cfg["init_from"]:
        raise SystemExit("--init_from=MODEL is required: a folder (e.g. out/run/pretrain/hf) or a .gguf, or resume")


def load_for_tuning(cfg, fmt):
    """(model, tokenizer, data directory, max_len) of a fine-tuning run (SFT, DPO): the model of init_from, the data
    of format fmt checked against its tokenizer, the embeddings grown for tokens the data's tokenizer added."""
    model, model_tok = checkpoint.build_model(cfg["init_from"], cfg["out_dir"])
    long_context(model, cfg)
    # more ids than embeddings is only right when the data's tokenizer is the model's plus added tokens
    grows = bool(read_meta(cfg["data_dir"]).get("added_tokens"))
    data = open_data_dir(cfg["data_dir"], fmt, tokenizer=model_tok, vocab_size=None if grows else model.config.vocab_size)
    from tokenizer import load_tokenizer
    tok = load_tokenizer(data.tokenizer_dir) if data.tokenizer_dir else model_tok
    if tok is None:
        raise SystemExit(f"neither {cfg['data_dir']} nor the model holds a tokenizer")
    if data.meta["vocab_size"] > model.config.vocab_size:
        new = resize_embeddings(model, data.meta["vocab_size"])
        log(f"embeddings resized to {new} rows for the tokens the data's tokenizer added: "
            f"{', '.join(data.meta.get('added_tokens') or {})}")
    length = cfg["max_len"] or model.config.max_seq_len
    if length > model.config.max_seq_len:
        raise SystemExit(f"max_len={length} exceeds the model's context of {model.config.max_seq_len}")
    return model, tok, data, length


def long_context(model, cfg):
    """cfg's context extension (written into the model's config) and S²-Attn for training, on a run's model."""
    checkpoint.extend_context(model, cfg["rope_scaling"], cfg["extend_to"])
    model.s2_groups = cfg["s2_attn_groups"]


def pad_id(tok):
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


def add_adapters(model, cfg, data):
    """LoRA/QLoRA adapters as cfg says; embed and lm_head train in full when the data's tokenizer added tokens."""
    extra = cfg["trainable"] or ("embed,lm_head" if data.meta.get("added_tokens") else "")
    torch.manual_seed(cfg["seed"])  # the A matrices are random, and the trainer seeds torch only after this
    quantize = {}
    if cfg["method"] == "qlora":  # the NF4 layers multiply in the run's dtype
        dtype = inference.resolve_dtype(cfg["dtype"], cfg["device"])[0]
        quantize = dict(quantize="nf4", compute_dtype=getattr(torch, dtype))
    try:
        lora.add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"],
                      cfg["use_rslora"], trainable=extra, **quantize)
    except ValueError as e:  # a module name the model lacks, or one named both as target and trainable
        raise SystemExit(f"lora_targets={cfg['lora_targets']!r}, trainable={extra!r}: {e}") from None


def resolve_schedule(cfg, train, val):
    """Fill in the settings left at 0: max_iters from epochs, eval_interval (twice an epoch), eval_iters (all of
    val), for batches of cfg's batch_size."""
    steps_per_epoch = math.ceil(len(train) / (cfg["batch_size"] * cfg["grad_accum"]))
    cfg.update(max_iters=cfg["max_iters"] or math.ceil(cfg["epochs"] * steps_per_epoch),
               eval_interval=cfg["eval_interval"] or max(1, steps_per_epoch // 2),
               eval_iters=cfg["eval_iters"] or (math.ceil(len(val) / cfg["batch_size"]) if val else 1))


def disable_dropout(model):
    """TRL's disable_dropout (LoRA's dropout too): the policy scores as its reference does, so the rewards start
    at 0 and a cached reference equals a live one."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # model.Attention's attention-weight dropout
            m.dropout = 0.0
