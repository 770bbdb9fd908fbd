"""Pretrain a LLaMA- or Phi-style model on a packed token stream (data_process.py's train.bin / val.bin).

    python pretrain.py config/tiny.py                          # one process (CPU or one GPU)
    python pretrain.py config/pydocs.py config/phi_tiny.py     # a small Phi-2-style model
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py                      # DDP
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py --parallel=fsdp      # FSDP2
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py --parallel=deepspeed --deepspeed_config=config/ds_zero2.json
    python pretrain.py config/tiny.py --init_from=resume       # continue the latest checkpoint in out_dir
    python pretrain.py config/long_yarn.py --init_from=out/long/base/hf     # 256 -> 1024 tokens: YaRN + 200 steps
    python pretrain.py config/long_s2_lora.py --init_from=out/long/base/hf  # ... S²-Attn + LoRA (LongLoRA)

The loop itself lives in trainer.py (shared with SFT and DPO); this file only says what pretraining is: random
windows of block_size+1 tokens from the stream, next-token loss on all of them. Started from a trained model, it is
continued pretraining: rope_scaling + extend_to stretch the model's context first (a short run at the new
block_size is YaRN's fine-tune), s2_attn_groups trains with LongLoRA's S²-Attn, method=lora with LoRA.
"""
import sys

import numpy as np
import torch

import checkpoint
import configurator
import trainer
import tuning
from data import open_data_dir, read_meta
from metrics import log
from model import ModelConfig

# -- the training loop's settings: every field of trainer.TrainConfig (batch, optimizer and schedule, precision,
#    parallelism, evaluation, checkpoints, logging) is a key of this script; pretraining's own defaults follow
globals().update(vars(trainer.TrainConfig()))
out_dir = "out/pretrain"
max_iters = 2000
# -- data and the starting point
data_dir = "data/pretrain"
init_from = "scratch"         # scratch | resume | a model folder or .gguf to start from (its tokenizer must be the data's)
# -- a started-from model's context extension and S²-Attn (rope_scaling, extend_to, s2_attn_groups), and LoRA
#    (method=lora|qlora, lora_rank, lora_alpha, lora_dropout, lora_targets, use_rslora, trainable, merge_dtype):
#    the keys of fine_tuning.py, described in tuning.TuningConfig
globals().update({k: getattr(tuning.TuningConfig(), k) for k in tuning.ADAPTER_KEYS + tuning.LONG_CONTEXT_KEYS})
# -- model (ignored when resuming or starting from a model folder: the checkpoint's own config is used)
family = "llama"              # llama (RMSNorm, SwiGLU, sequential blocks) | phi (Phi-2: LayerNorm, GELU MLP,
                              # parallel attention + MLP, partial rotary, biases)
vocab_size = 0                # 0: meta.json's vocab_size
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0                # 0: n_heads (multi-head); fewer: grouped-query attention
hidden_dim = 0                # 0: the family's rule (LLaMA 8/3*dim, Phi 4*dim)
rope_theta = 10000.0
partial_rotary_factor = 1.0   # fraction of each head that is rotated (Phi-2: 0.4)
tie_embeddings = True
dropout = 0.0
block_size = 256              # tokens per training window; the model's max_seq_len

FAMILIES = {"llama": {},
            "phi": dict(norm="layernorm", mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True,
                        lm_head_bias=True)}


class PretrainData:
    """Random windows from a flat token stream. Batch (step, micro) is drawn from a generator seeded with
    (seed, step, micro), so it is the same whichever process draws it, and on resume, with no state to save."""

    def __init__(self, data, block_size, batch_size, seed):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        for split in ("train", "val"):
            n = len(data.tokens(split))
            if n <= block_size + 1:
                raise SystemExit(f"{data.file(split + '.bin')}: {n} tokens, fewer than block_size+1={block_size + 1}; "
                                 f"lower block_size")

    def _windows(self, split, rng):
        tokens = self.data.tokens(split)
        starts = rng.integers(0, len(tokens) - self.block_size - 1, size=self.batch_size)
        w = torch.from_numpy(np.stack([tokens[i:i + self.block_size + 1] for i in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step, micro):
        return self._windows("train", np.random.default_rng([self.seed, 0, step, micro]))

    def val_batch(self, i):
        return self._windows("val", np.random.default_rng([self.seed, 1, i]))


def scratch_config(vocab):
    if family not in FAMILIES:
        raise SystemExit(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
    for key in ("dim", "n_layers", "n_heads", "block_size"):
        if globals()[key] < 1:
            raise SystemExit(f"{key}={globals()[key]}: must be at least 1")
    try:
        return ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=n_kv_heads or None, hidden_dim=hidden_dim or None, max_seq_len=block_size,
                           rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor,
                           tie_embeddings=tie_embeddings, dropout=dropout, **FAMILIES[family])
    except ValueError as e:
        raise SystemExit(str(e))


def main():
    # the deepspeed launcher adds --local_rank=N; the rank comes from the environment anyway
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    trainer.train_config(cfg)  # every setting checked before any work
    tuning.check_adapter_settings(cfg)
    if method != "full" and init_from == "scratch":
        raise SystemExit(f"method={method}: LoRA adapts a trained model; name it with --init_from")
    meta_vocab = read_meta(data_dir)["vocab_size"]
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (FSDP shards them as they are)
    model, model_tok = checkpoint.build_model(init_from, out_dir, scratch_config(vocab_size or meta_vocab))
    tuning.long_context(model, cfg)
    if model.config.max_seq_len < block_size:
        raise SystemExit(f"block_size={block_size} exceeds the model's max_seq_len={model.config.max_seq_len}"
                         + ("" if rope_scaling else "; extend it with --rope_scaling=yarn --extend_to=N"))
    data = open_data_dir(data_dir, "pretrain", tokenizer=model_tok, vocab_size=model.config.vocab_size)
    if "tokenizer_sha256" in data.meta:
        log(f"data: {data_dir} matches the model's tokenizer (sha256 {data.meta['tokenizer_sha256'][:12]}...)")
    tokenizer_dir = data.tokenizer_dir or (init_from if model_tok is not None else None)
    export = None
    if method != "full":
        tuning.add_adapters(model, cfg, data)
        from tokenizer import load_tokenizer
        export = tuning.lora_export(model_tok or load_tokenizer(tokenizer_dir), merge_dtype)
    batches = PretrainData(data, block_size, cfg["batch_size"], cfg["seed"])
    trainer.Trainer(cfg, model, batches.train_batch, batches.val_batch, tokenizer_dir=tokenizer_dir,
                    export=export).fit()


if __name__ == "__main__":
    main()
