"""Pretrain a LLaMA-style model on a packed token stream (data_process.py's train.bin / val.bin).

    python pretrain.py config/tiny.py                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py                      # DDP
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py --parallel=fsdp      # FSDP2
    torchrun --nproc_per_node=4 pretrain.py config/llama_124m.py --parallel=deepspeed --deepspeed_config=config/ds_zero2.json
    python pretrain.py config/tiny.py --init_from=resume       # continue the latest checkpoint in out_dir

The loop itself lives in trainer.py (shared with SFT and DPO); this file only says what pretraining is: random
windows of block_size+1 tokens from the stream, next-token loss on all of them.
"""
import json
import os
import sys

import numpy as np
import torch

from checkpoint import latest_checkpoint, read_trainer_state
import configurator
from model import ModelConfig, Transformer
from trainer import Trainer, check_data_dir

# -- data and output
data_dir = "data/pretrain"
out_dir = "out/pretrain"
init_from = "scratch"         # scratch | resume | a model folder or .gguf to start from (Transformer.from_pretrained)
# -- model (ignored when resuming or starting from a model folder: the checkpoint's own config is used)
vocab_size = 0                # 0: meta.json's vocab_size
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0                # 0: n_heads (multi-head); fewer: grouped-query attention
hidden_dim = 0                # 0: LLaMA's 8/3*dim rule
rope_theta = 10000.0
tie_embeddings = True
dropout = 0.0
# -- batch: tokens per optimizer step = batch_size * block_size * grad_accum (however many processes)
batch_size = 16
block_size = 256
grad_accum = 1
# -- optimizer and schedule
max_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 0            # 0: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# -- system
dtype = "auto"                # auto (bf16 where supported) | float32 | bfloat16 | float16
device = "auto"
compile = False
activation_checkpointing = False
parallel = "ddp"              # ddp | fsdp | deepspeed (DDP only when torchrun starts several processes)
deepspeed_config = "config/ds_zero2.json"
seed = 1337
# -- evaluation, checkpoints, logging
eval_interval = 250
eval_iters = 20
log_interval = 10
keep_last = 3
max_nan_skips = 10
peak_flops = 0.0              # for MFU; 0: the device's known bf16 peak
wandb_mode = "off"            # off | online | offline
wandb_project = "tinyllm"
wandb_run_name = ""


class PretrainData:
    """Random windows from a flat token stream. Batch (step, micro) is drawn from a generator seeded with
    (seed, step, micro), so it is the same whichever process draws it, and on resume, with no state to save."""

    def __init__(self, data_dir, dtype, block_size, batch_size, seed):
        self.paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")}
        self.dtype, self.block_size, self.batch_size, self.seed = np.dtype(dtype), block_size, batch_size, seed
        for split, path in self.paths.items():
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: not found; make the data directory with data_process.py")
            n = os.path.getsize(path) // self.dtype.itemsize
            if n <= block_size + 1:
                raise SystemExit(f"{path}: {n} tokens, fewer than block_size+1={block_size + 1}; lower block_size")

    def _windows(self, split, rng):
        # a fresh memmap per batch: a long-lived one keeps every page it touched and grows without bound
        data = np.memmap(self.paths[split], dtype=self.dtype, mode="r")
        starts = rng.integers(0, len(data) - self.block_size - 1, size=self.batch_size)
        w = np.stack([data[i:i + self.block_size + 1] for i in starts]).astype(np.int64)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step, micro):
        return self._windows("train", np.random.default_rng([self.seed, 0, step, micro]))

    def val_batch(self, i):
        return self._windows("val", np.random.default_rng([self.seed, 1, i]))


def build_model(vocab):
    if init_from == "resume":
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise SystemExit(f"init_from=resume: no checkpoint in {out_dir}/ckpt")
        return Transformer(ModelConfig(**read_trainer_state(ckpt)["model_config"]))
    if init_from != "scratch":
        if not hasattr(Transformer, "from_pretrained"):
            raise SystemExit(f"init_from={init_from}: this model.py has no Transformer.from_pretrained yet")
        return Transformer.from_pretrained(init_from, dtype=torch.float32)  # fp32 master weights, whatever is stored
    return Transformer(ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                   n_kv_heads=n_kv_heads or None, hidden_dim=hidden_dim or None, max_seq_len=block_size,
                                   rope_theta=rope_theta, tie_embeddings=tie_embeddings, dropout=dropout))


if __name__ == "__main__":
    # the deepspeed launcher adds --local_rank=N; the rank comes from the environment anyway
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{meta_path}: not found; make the data directory with data_process.py")
    with open(meta_path) as f:
        data_vocab = json.load(f).get("vocab_size", 0)
    torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model = build_model(vocab_size or data_vocab)
    if model.config.max_seq_len < block_size:
        raise SystemExit(f"block_size={block_size} exceeds the model's max_seq_len={model.config.max_seq_len}")
    meta, tokenizer_dir = check_data_dir(data_dir, model.config.vocab_size)
    data = PretrainData(data_dir, meta["dtype"], block_size, batch_size, seed)
    trainer = Trainer(cfg, model, data.train_batch, data.val_batch, tokenizer_dir=tokenizer_dir)
    trainer.fit()
