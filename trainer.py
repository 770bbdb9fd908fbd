"""The one training loop that pretraining, SFT and DPO all run on.

A script builds a model, a batch function and (optionally) a loss function and a frozen reference model, then:

    trainer = Trainer(cfg, model, train_batch, val_batch, loss_fn=lm_loss, ref_model=None)
    trainer.fit()

- `cfg` is the script's resolved config dict (configurator.apply); the keys of TrainConfig below are read from it.
- `train_batch(step, micro)` returns a tuple of CPU tensors for optimizer step `step` and micro-batch `micro`
  in [0, grad_accum). `micro` is *global*: each rank draws its own slice of the indices, so one process with
  grad_accum=4 and four processes with grad_accum=4 see the same global batch. Because a batch is a pure function
  of (step, micro), the data position is just the step: resume and every parallel backend get the same data.
- `val_batch(i)` returns batch i in [0, eval_iters); the same windows at every evaluation.
- `loss_fn(model, batch, ref_model)` returns a scalar loss, or (loss, {name: float tensor}) for extra metrics
  that are averaged and logged. `batch` is already on the device. Pretraining and SFT use `lm_loss` (batches of
  (input ids, labels with -100 = no loss)); DPO passes its preference loss and a reference model, which the
  trainer moves to the device, freezes and keeps replicated on every rank. Run chosen and rejected sequences
  through `model` in ONE forward (concatenated): DDP and FSDP expect one forward per backward.
- `weight_fn(batch)` counts what a micro-batch's loss is a mean over (default: its labels that are not -100).
  Each micro-batch's loss is weighted by its share of the optimizer step's total over all micro-batches and
  processes, so the step minimises the mean over every supervised token of the step: batch 8 x accumulation 1
  equals batch 1 x accumulation 8 on samples of different lengths. DPO counts pairs.
- `on_eval(trainer)` (optional) runs on rank 0 after each evaluation (SFT answers a few held-out prompts);
  `export(trainer)` (optional) writes the final model instead of the plain hf/ export (LoRA: the adapter and
  the merged model); it runs on every rank, as trainer.full_state_dict() is collective under FSDP and ZeRO-3.
- Checkpoints hold the trainable parameters (all of them in pretraining; LoRA's A/B and the modules trained in
  full in LoRA/QLoRA) and buffers; frozen base weights are rebuilt from the model the run started from.

Parallelism: `parallel="ddp"` is plain single-process training, or DDP when launched by torchrun with several
processes; "fsdp" is FSDP2 fully_shard per block with sharded (torch.distributed.checkpoint) checkpoints;
"deepspeed" is ZeRO 1/2/3 from a JSON config. `grad_accum` is the global number of micro-batches per optimizer
step and is divided among the processes, so a config means the same global batch however it is launched.
"""
import glob
import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from data import bits_per_byte, read_meta, split_bytes
from distributed import barrier, deepspeed_engine, setup_distributed, teardown_distributed
from inference import resolve_dtype
from model_kernels import use_kernels
from optimizers import OPTIMIZERS, check_optimizer, check_same_optimizer, make_optimizer, set_hyperparameters
from metrics import default_peak_flops, log, plot_losses, read_metrics, start_wandb


@dataclass
class TrainConfig:
    out_dir: str = "out"
    max_iters: int = 1000            # optimizer steps
    batch_size: int = 16             # sequences per micro-batch per process
    grad_accum: int = 1              # micro-batches per optimizer step, summed over all processes
    learning_rate: float = 6e-4
    min_lr: float = 6e-5             # the cosine decays to this
    warmup_iters: int = 100
    lr_schedule: str = "cosine"      # cosine (to min_lr at lr_decay_iters) | constant (after the warmup)
    lr_decay_iters: int = 0          # 0: max_iters
    weight_decay: float = 0.1        # on matrices (dim >= 2) only; norms and biases are not decayed
    beta1: float = 0.9               # AdamW's betas (with optimizer=muon: for embeddings, lm_head, norms, biases)
    beta2: float = 0.95
    optimizer: str = "adamw"         # adamw | muon: Muon for the blocks' matrices, same learning_rate (optimizers.py)
    grad_clip: float = 1.0           # 0: no clipping (the norm is still logged)
    dtype: str = "auto"              # auto (bf16 where the hardware runs it fast: inference.resolve_dtype) | float32
                                     # | bfloat16 | float16
    device: str = "auto"             # auto | cpu | cuda
    compile: bool = False            # torch.compile (minutes of warm-up on CPU; worth it on GPU)
    activation_checkpointing: bool = False
    kernels: str = "torch"           # torch | triton: fused RMSNorm/LayerNorm, RoPE, SwiGLU (model_kernels.py; CUDA)
    chunked_loss: bool = False       # linear + cross-entropy a chunk of rows at a time, only rows with a loss:
                                     # no (tokens x vocab) logits (model_kernels.py); worth it for large vocabularies
    parallel: str = "ddp"            # ddp (single process unless torchrun starts several) | fsdp | deepspeed
    deepspeed_config: str = "config/ds_zero2.json"
    init_from: str = "scratch"       # scratch | resume | a model folder or .gguf (checkpoint.build_model)
    overwrite: bool = False          # a new run into an out_dir that holds another run: remove that run's files
                                     # first (checkpoint.RUN_FILES); False: refused, so no run is lost by a typo
    seed: int = 1337
    eval_interval: int = 250         # evaluate and checkpoint every this many steps
    eval_iters: int = 20
    log_interval: int = 10
    keep_last: int = 3               # checkpoints kept besides the best one
    max_nan_skips: int = 10          # abort after this many non-finite losses in a row
    peak_flops: float = 0.0          # for MFU; 0: known default for the device (see default_peak_flops)
    wandb_mode: str = "off"          # off | online | offline
    wandb_project: str = "tinyllm"
    wandb_run_name: str = ""


CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "device": ("auto", "cpu", "cuda"),
           "lr_schedule": ("cosine", "constant"), "optimizer": OPTIMIZERS, "kernels": ("torch", "triton"),
           "parallel": ("ddp", "fsdp", "deepspeed"), "wandb_mode": ("off", "online", "offline")}
AT_LEAST_ONE = ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                "max_nan_skips")
NOT_NEGATIVE = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip",
                "keep_last", "peak_flops")


def train_config(cfg):
    """The TrainConfig of a script's resolved config, every value checked before any work starts: a zero or
    negative count or interval, an unknown choice or an out_dir that is a file stops here, naming the key."""
    c = TrainConfig(**{f.name: cfg[f.name] for f in fields(TrainConfig) if f.name in cfg})
    for key in AT_LEAST_ONE:
        if getattr(c, key) < 1:
            raise SystemExit(f"{key}={getattr(c, key)}: must be at least 1")
    for key in NOT_NEGATIVE:
        if getattr(c, key) < 0:
            raise SystemExit(f"{key}={getattr(c, key)}: must not be negative")
    for key, options in CHOICES.items():
        if getattr(c, key) not in options and not (key == "device" and getattr(c, key).startswith("cuda:")):
            raise SystemExit(f"{key}={getattr(c, key)!r}: expected one of {', '.join(options)}")
    if c.min_lr > c.learning_rate:
        raise SystemExit(f"min_lr={c.min_lr} is above learning_rate={c.learning_rate}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(c, key) < 1:
            raise SystemExit(f"{key}={getattr(c, key)}: must be in [0, 1)")
    if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
        raise SystemExit(f"out_dir={c.out_dir}: is a file, not a folder")
    check_optimizer(c)
    checkpoint.check_out_dir(c.out_dir, c.init_from, c.overwrite)
    log("dtype={} ({})".format(*resolve_dtype(c.dtype, c.device)))  # the run's first line: a slow dtype shows at once
    return c


def lm_loss(model, batch, ref_model=None):
    """Next-token cross-entropy over the labels that are not -100 (pretraining, SFT): batches of (input ids,
    labels) or, packed, (input ids, labels, document ids)."""
    x, y, *packed = batch
    return (model(x, y, doc_ids=packed[0]) if packed else model(x, y))[1]


def supervised_tokens(batch):
    """What lm_loss is a mean over: the labels that are not -100."""
    return (batch[1] != -100).sum()


# ----------------------------------------------------------------------------------------------- small helpers

def lr_at(step, c):
    """Linear warmup, then cosine from learning_rate to min_lr at lr_decay_iters (nanoGPT), or constant. A pure
    function of the step and the config, set on the optimizer every step: a resumed run follows the schedule its
    own config asks for, never one stored in the checkpoint."""
    decay_iters = c.lr_decay_iters or c.max_iters
    if step < c.warmup_iters:
        lr = c.learning_rate * (step + 1) / (c.warmup_iters + 1)
    elif c.lr_schedule == "constant":
        lr = c.learning_rate
    elif step > decay_iters:
        lr = c.min_lr
    else:
        ratio = (step - c.warmup_iters) / max(1, decay_iters - c.warmup_iters)
        lr = c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)
    return lr


# ------------------------------------------------------------------------------------------------ the trainer

class Trainer:
    def __init__(self, cfg, model, train_batch, val_batch=None, loss_fn=lm_loss, ref_model=None, tokenizer_dir=None,
                 weight_fn=supervised_tokens, on_eval=None, export=None):
        self.cfg = dict(cfg)
        self.c = c = train_config(cfg)
        self.train_batch, self.val_batch, self.loss_fn = train_batch, val_batch, loss_fn
        self.weight_fn, self.on_eval, self.export = weight_fn, on_eval, export
        self.tokenizer_dir = tokenizer_dir
        # what the run trains on, recorded in its checkpoints; its kind is the data's format, as pretrain.py,
        # fine_tuning.py and dpo.py each open only their own
        data_dir = cfg.get("data_dir")
        meta = read_meta(data_dir) if data_dir else {}
        self.kind, self.val_text = meta.get("format"), split_bytes(meta, "val")  # val (tokens, bytes): bits per byte
        if self.kind == "pretrain" and not self.val_text:
            log(f"{data_dir}/meta.json records no bytes per split (data made before they were): no val bpb")
        self.data = checkpoint.data_fingerprint(data_dir) if data_dir else None
        self.resume_from = checkpoint.resume_checkpoint(c.out_dir) if c.init_from == "resume" else None
        if self.resume_from:
            checkpoint.check_same_kind(*self.resume_from, self.kind, c.out_dir)
        self.rank, self.world, self.device = setup_distributed(c.parallel, c.device)
        self.master = self.rank == 0
        if c.grad_accum % self.world:
            raise SystemExit(f"grad_accum={c.grad_accum} must be a multiple of the {self.world} processes")
        self.accum = c.grad_accum // self.world
        self.dtype, self.dtype_why = resolve_dtype(c.dtype, self.device)
        self.mode = c.parallel if (self.world > 1 or c.parallel != "ddp") else "single"
        if self.device.type == "cpu" and self.world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # torchrun sets 1 thread per process; the deepspeed launcher sets nothing, and the processes of one
            # machine would each take every core
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        # dropout etc. differ per rank; the data does not depend on these generators (see train_batch)
        torch.manual_seed(c.seed + self.rank)
        np.random.seed(c.seed + self.rank)
        random.seed(c.seed + self.rank)

        self.raw_model = model
        self.frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
        self.model_source = c.init_from  # what build_model started from; a resume keeps the first run's
        self.model_cls = type(model)  # before FSDP swaps the class; the HF export builds a fresh one from it
        model.gradient_checkpointing = c.activation_checkpointing
        if c.kernels == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("kernels=triton runs on CUDA; on CPU use kernels=torch (TRITON_INTERPRET=1 runs the "
                             "Triton kernels through triton's interpreter: for tests, far too slow to train)")
        for m in (model, ref_model):
            if m is not None:
                use_kernels(m, c.kernels, c.chunked_loss)
        model.to(self.device).train()  # from_pretrained hands models over in eval mode
        self.ref_model = ref_model.to(self.device).eval().requires_grad_(False) if ref_model is not None else None
        self.scaler = None
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype)
        self.autocast = torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self.optimizer = None
        self.engine = None
        if self.mode == "deepspeed":
            self._setup_deepspeed(model)
        else:
            if self.mode == "fsdp":
                from torch.distributed.fsdp import fully_shard
                for layer in model.layers:
                    fully_shard(layer)
                fully_shard(model)
            if c.compile:  # in place, so state_dict keys stay clean; per block under FSDP (its hooks break graphs)
                for m in (model.layers if self.mode == "fsdp" else [model]):
                    m.compile()
            self.model = model
            if self.mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                self.model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.optimizer = make_optimizer(model, c, self.device)
            if self.dtype == "float16":
                self.scaler = torch.amp.GradScaler(self.device.type)

        self.step = 0
        self.best_val_loss, self.best_step = float("inf"), -1
        self.nan_skips_total = 0
        self.tokens_seen = 0
        self.stop_signal = 0
        self.resumed = False
        self.seq_len = 0
        self.wandb = None
        self.t_start, self.train_time = 0.0, 0.0  # wall clock and time in training steps, carried over resumes
        self.ckpt_root = os.path.join(c.out_dir, "ckpt")
        self.metrics_path = os.path.join(c.out_dir, "metrics.jsonl")
        if self.master:
            if c.overwrite:
                checkpoint.remove_run(c.out_dir)
            os.makedirs(self.ckpt_root, exist_ok=True)
            for d in glob.glob(os.path.join(self.ckpt_root, "*.tmp")):  # left by a run killed while saving
                shutil.rmtree(d, ignore_errors=True)
        barrier()

    def _setup_deepspeed(self, model):
        self.autocast = nullcontext()  # DeepSpeed holds the model in bf16/fp16 itself
        if self.c.compile:
            model.compile()
        # the optimizer returned is DeepSpeed's (ZeRO) wrapper; set_hyperparameters writes into its param groups
        self.engine, self.optimizer, self.zero_stage = deepspeed_engine(
            model, make_optimizer(model, self.c, self.device), self.c, self.accum, self.dtype, self.device)
        if self.zero_stage == 3 and self.c.chunked_loss:  # it reads lm_head.weight, which ZeRO-3 partitions away
            raise SystemExit("chunked_loss=True does not work with ZeRO stage 3: use stage 1/2 or chunked_loss=False")
        self.model = self.engine

    # -------------------------------------------------------------------------------------------- one step

    def set_hyperparameters(self):
        """This step's learning rate, and the config's betas and weight decay (matrices only): an optimizer state
        loaded on resume carries the old run's values, and the config of the run being resumed wins."""
        set_hyperparameters(self.optimizer, lr_at(self.step, self.c), self.c)

    def _to_device(self, batch):
        pin = self.device.type == "cuda"
        return tuple(t.pin_memory().to(self.device, non_blocking=True) if pin else t.to(self.device) for t in batch)

    def _compute_loss(self, batch):
        with self.autocast:
            out = self.loss_fn(self.model, batch, self.ref_model)
        return out if isinstance(out, tuple) else (out, {})

    def train_step(self):
        """One optimizer step over this rank's micro-batches. Returns (loss, grad_norm, extra metrics, skipped).
        Each micro-batch's mean loss is weighted by its share of the step's weight_fn total over all micro-batches
        and processes (DDP, FSDP and DeepSpeed average gradients over processes; DeepSpeed also divides by the
        accumulation steps itself), so the step's gradient is that of the mean over all its supervised units."""
        c, model = self.c, self.model
        self.set_hyperparameters()
        batches = [self.train_batch(self.step, self.rank * self.accum + k) for k in range(self.accum)]
        weights = torch.tensor([float(self.weight_fn(b)) for b in batches])
        total = weights.sum().to(self.device)
        if self.world > 1:
            dist.all_reduce(total)
        total = total.item()
        if total == 0:  # every label of the step, on every rank, is -100: nothing to learn from
            log(f"step {self.step}: no supervised token in the step's batches")
            self.step += 1
            return float("nan"), float("nan"), {}, True
        scales = (weights * self.world / total * (self.accum if self.engine is not None else 1)).tolist()
        loss_sum = torch.zeros((), device=self.device)
        extras = {}
        for k, batch in enumerate(batches):
            batch = self._to_device(batch)
            self.seq_len = batch[0].shape[-1]
            self.tokens_seen += batch[0].numel() * self.world
            last = k == self.accum - 1
            sync = model.no_sync() if self.mode == "ddp" and not last else nullcontext()
            with sync:
                loss, metrics = self._compute_loss(batch)
                scaled = loss * scales[k]
                if self.engine is not None:
                    self.engine.backward(scaled)  # scales by 1/gradient_accumulation_steps itself
                    self.engine.step()            # an optimizer step only at the accumulation boundary
                elif self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            share = weights[k].item() / total  # of the step, over every process: summed below
            loss_sum += loss.detach().float() * share
            for name, v in metrics.items():
                extras[name] = extras.get(name, 0.0) + torch.as_tensor(v, device=self.device).detach().float() * share
        # one collective and one host sync per step: the loss, the extra metrics and the stop flag of every rank
        stop = torch.tensor(float(self.stop_signal > 0), device=self.device)
        packed = torch.stack([loss_sum, stop, *extras.values()])
        if self.world > 1:
            dist.all_reduce(packed)  # the loss and metrics are shares of the whole step: summed, not averaged
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            norm = torch.tensor(float("nan") if norm is None else float(norm))
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), c.grad_clip or float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
                norm = norm.full_tensor()
        values = torch.cat([packed, norm.reshape(1).to(packed)]).tolist()
        loss, stop, norm = values[0], values[1], values[-1]
        if stop > 0 and not self.stop_signal:
            self.stop_signal = signal.SIGTERM  # another rank was signalled
        skipped = not math.isfinite(loss) or (self.scaler is None and self.engine is None and not math.isfinite(norm))
        if self.engine is None:
            if self.scaler is not None:  # the scaler skips steps with inf/nan gradients on its own
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif not skipped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm, dict(zip(extras, values[2:-1])), skipped

    @torch.no_grad()
    def evaluate(self):
        """(mean loss, {name: mean}) of the loss_fn's extra metrics over val_batch(0 .. eval_iters-1), weighted by
        weight_fn, split across ranks. Every rank runs the same number of forwards (FSDP and ZeRO-3 gather weights
        collectively); padding batches count zero."""
        self.model.eval()
        sums, names = None, []
        n = self.c.eval_iters
        for j in range(math.ceil(n / self.world)):
            i = j * self.world + self.rank
            batch = self.val_batch(i % n)
            loss, metrics = self._compute_loss(self._to_device(batch))
            names = list(metrics)
            values = torch.stack([loss.detach().float(), *(torch.as_tensor(v, device=self.device).detach().float()
                                                          for v in metrics.values()), torch.ones((), device=self.device)])
            weight = float(self.weight_fn(batch)) if i < n else 0.0  # the mean over every unit, as in training
            if weight > 0:
                sums = values * weight if sums is None else sums + values * weight
        if sums is None:  # this rank had no batch to count
            sums = torch.zeros(len(names) + 2, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        self.model.train()
        means = (sums[:-1] / sums[-1]).tolist()
        return means[0], dict(zip(names, means[1:]))

    # -------------------------------------------------------------------------------------------- checkpoints

    def _trainer_state(self):
        state = {"step": self.step, "config": self.cfg, "best_val_loss": self.best_val_loss,
                 "best_step": self.best_step, "nan_skips_total": self.nan_skips_total,
                 "tokens_seen": self.tokens_seen,
                 "elapsed_s": time.time() - self.t_start, "train_time_s": self.train_time,
                 "world_size": self.world, "parallel": self.mode, "model_source": self.model_source,
                 "frozen": sorted(self.frozen_names), "kind": self.kind, "data": self.data,
                 "model_config": asdict(self.raw_model.config) if hasattr(self.raw_model, "config") else {}}
        if self.engine is None:
            state["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        return state

    def weights_are_finite(self):
        """Whether every trained weight of every rank is finite (each rank checks its own shards; frozen weights
        never change, and a LoRA run's frozen base is most of the model)."""
        bad = torch.zeros((), device=self.device)
        with torch.no_grad():
            for p in self.raw_model.parameters():
                if not p.requires_grad:
                    continue
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
                bad += (~torch.isfinite(local)).any().float()
        if self.world > 1:
            dist.all_reduce(bad)
        return bad.item() == 0

    def save_checkpoint(self, reason=""):
        """Write out_dir/ckpt/step_NNNNNNNN atomically: everything goes into a .tmp directory, is fsynced, and
        only then renamed, so a kill at any moment leaves either the old set of checkpoints or the new one. Weights
        that hold NaN/inf are never saved, and a full disk keeps the checkpoints already there."""
        last_good = checkpoint.latest_checkpoint(self.c.out_dir)
        if not self.weights_are_finite():
            raise SystemExit(f"step {self.step}: the weights hold NaN or inf, so no checkpoint is saved; the last good "
                             f"one is {last_good or 'none'} (resume from it with a lower learning_rate)")
        name = f"step_{self.step:08d}"
        final, tmp = os.path.join(self.ckpt_root, name), os.path.join(self.ckpt_root, name + ".tmp")
        try:
            self._write_checkpoint(tmp, final, reason)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"writing checkpoint {tmp} failed: {e.strerror or e} (disk full?); nothing was replaced, "
                             f"the last good checkpoint is {last_good or 'none'}")

    def _write_checkpoint(self, tmp, final, reason):
        if self.master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        state = self._trainer_state()
        if self.mode in ("single", "ddp"):
            state["model"] = self.trainable_state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        elif self.mode == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            msd, osd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
        else:
            self.engine.save_checkpoint(tmp, tag="deepspeed")
        if self.master:
            torch.save(state, os.path.join(tmp, "state.pt"))
        torch.save(checkpoint.rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        if hasattr(self.train_batch, "state_dict"):  # a batch source with state of its own (rl.py's rollouts)
            torch.save(self.train_batch.state_dict(), os.path.join(tmp, f"batches_rank{self.rank}.pt"))
        barrier()
        if self.master:
            checkpoint.publish(tmp, final)
            if self.best_step >= 0:
                checkpoint.atomic_write_json({"best_step": self.best_step, "best_val_loss": self.best_val_loss,
                                              "dir": f"step_{self.best_step:08d}"},
                                             os.path.join(self.ckpt_root, "best.json"))
            checkpoint.prune(self.c.out_dir, self.c.keep_last, keep={final, os.path.join(
                self.ckpt_root, f"step_{self.best_step:08d}")})
            log(f"checkpoint: {final}{' (' + reason + ')' if reason else ''}")
        barrier()

    def load_checkpoint(self, path, state):
        saved_by = state["parallel"] if state["parallel"] != "single" else "ddp"  # the same files
        if saved_by != (self.mode if self.mode != "single" else "ddp"):
            raise SystemExit(f"{path}: saved with parallel={saved_by}; resume it with --parallel={saved_by}")
        check_same_optimizer(state["config"], self.c, path)
        if self.mode in ("single", "ddp"):
            missing, unexpected = self.raw_model.load_state_dict(state["model"], strict=False)
            not_frozen = [k for k in missing if not self._frozen(k)]
            if unexpected or not_frozen:
                raise SystemExit(f"{path}: its weights do not fit this model (unexpected: {unexpected[:5]}, missing: "
                                 f"{not_frozen[:5]}); resume with the settings that made it")
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.mode == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            msd, osd = get_state_dict(self.model, self.optimizer)
            sd = {"model": msd, "optimizer": osd}
            dcp.load(sd, checkpoint_id=path)
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
            self.engine.load_checkpoint(path, tag="deepspeed")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.report_changes(state["config"], path)
        self.model_source = state.get("model_source", self.model_source)
        self.step = state["step"]
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        saved = state.get("data")
        if saved and self.data and saved["checksum"] != self.data["checksum"]:
            log(f"resume: {path} trained on other data ({saved['data_dir']}, checksum {saved['checksum'][:12]}) "
                f"than this run's ({self.data['data_dir']}, {self.data['checksum'][:12]}); training goes on with this "
                f"run's, and the best checkpoint is chosen afresh (val losses on other data do not compare)")
            self.best_val_loss, self.best_step = float("inf"), -1
            if self.master and os.path.isfile(os.path.join(self.ckpt_root, "best.json")):
                os.remove(os.path.join(self.ckpt_root, "best.json"))
        self.nan_skips_total, self.tokens_seen = state["nan_skips_total"], state["tokens_seen"]
        self.t_start, self.train_time = time.time() - state["elapsed_s"], state["train_time_s"]  # clocks go on
        rng_path = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng_path):
            checkpoint.set_rng_state(checkpoint.load_tensors(rng_path))
        else:
            log(f"warning: {rng_path} missing (resumed with more processes?): this rank's RNG starts fresh")
        if hasattr(self.train_batch, "load_state_dict"):
            self.train_batch.load_state_dict(checkpoint.load_tensors(os.path.join(path, f"batches_rank{self.rank}.pt")))
        self.resumed = True
        log(f"resumed from {path} at step {self.step}")

    def report_changes(self, saved, path):
        """Say which settings differ from the checkpoint's run; the values of this run are the ones used (the
        learning rate, betas and weight decay too: set_hyperparameters overrides the loaded optimizer state)."""
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in self.cfg.items()
                   if k != "init_from" and k in saved and saved[k] != v]
        if changed:
            log(f"resume: settings changed since {path} (training settings take this run's values; the model's "
                f"shape stays the checkpoint's):\n  " + "\n  ".join(changed))

    def _frozen(self, key):
        """Whether a state-dict key belongs to a frozen parameter (its own key or a quantized weight's parts)."""
        return any(key == name or key.startswith(name + ".") for name in self.frozen_names)

    def trainable_state_dict(self):
        """What a checkpoint holds: every entry of the model's state dict except frozen parameters, which are
        rebuilt from the model the run started from (a LoRA checkpoint holds the adapters, not the base)."""
        return {k: v for k, v in self.raw_model.state_dict().items() if not self._frozen(k)}

    def full_state_dict(self):
        """The whole model's weights on CPU, on rank 0 (None elsewhere); collective under FSDP and ZeRO-3."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.mode == "deepspeed" and self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.raw_model.state_dict().items()} if self.master else None
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()} if self.master else None

    def export_model(self):
        """The final model: the script's export(trainer) on every rank (it may gather with full_state_dict), or
        the plain hf/ folder."""
        if self.export is not None:
            return self.export(self)
        return self.export_hf()

    def export_hf(self):
        """out_dir/hf: config.json + model.safetensors (convert.save_pretrained) and the data's tokenizer."""
        sd = self.full_state_dict()
        if not self.master:
            return
        out = os.path.join(self.c.out_dir, "hf")
        fresh = self.model_cls(self.raw_model.config)
        fresh.load_state_dict({k: v.float() for k, v in sd.items()})
        import convert
        convert.save_pretrained(fresh, out)
        if self.tokenizer_dir:
            from tokenizer import load_tokenizer
            load_tokenizer(self.tokenizer_dir).save_pretrained(out)
        log(f"model exported to {out}" + ("" if self.tokenizer_dir else " (without a tokenizer)"))

    # -------------------------------------------------------------------------------------------- logging

    def _clocks(self):
        return {"elapsed_s": round(time.time() - self.t_start, 3), "train_time_s": round(self.train_time, 3),
                "time": round(time.time(), 3)}  # unix time: lines up runs with outside clocks (bench_pretrain.py)

    def _record(self, rec):
        if self.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    # -------------------------------------------------------------------------------------------- the loop

    def _on_signal(self, signum, frame):
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    def fit(self):
        c = self.c
        self.t_start = time.time()
        try:
            if self.master:
                log("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in self.cfg.items()))
                checkpoint.atomic_write_json(self.cfg, os.path.join(c.out_dir, "config.json"))
            if self.resume_from:  # chosen and checked in __init__, before anything was written
                self.load_checkpoint(*self.resume_from)
                self.resume_from = None  # its tensors are loaded: free them
            if self.master:  # the metrics of a killed run past the checkpoint are replaced by the resumed run's
                recs = []
                if self.resumed and os.path.isfile(self.metrics_path):
                    recs = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
                with open(self.metrics_path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in recs)
            self.wandb = start_wandb(self.c, self.cfg) if self.master else None
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                self._loop()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        except (SystemExit, KeyboardInterrupt):
            teardown_distributed()  # decisions every rank took together: leave through the barrier
            raise
        except BaseException:
            if dist.is_initialized():  # one rank failed: no barrier, the others may never reach it
                dist.destroy_process_group()
            raise
        teardown_distributed()

    def _loop(self):
        from tqdm import tqdm
        c = self.c
        n_params = self.raw_model.num_params() if hasattr(self.raw_model, "num_params") else 0
        peak = c.peak_flops or default_peak_flops(self.device)
        log(f"parallel={self.mode} world={self.world} device={self.device} dtype={self.dtype} ({self.dtype_why}) "
            f"params={n_params / 1e6:.2f}M (excl. embeddings) global batch={c.batch_size * c.grad_accum} seqs "
            f"MFU peak={peak:.3g} FLOP/s per device")
        bar = tqdm(total=c.max_iters, initial=self.step, disable=None if self.master else True, dynamic_ncols=True,
                   leave=False)
        interval_time, interval_tokens, nan_in_row = 0.0, 0, 0
        last_eval_step = self.step if self.resumed else -1  # the checkpoint being resumed was saved after its eval
        while True:
            at_end = self.step >= c.max_iters
            if (self.step % c.eval_interval == 0 or at_end) and self.step != last_eval_step:
                last_eval_step = self.step
                if self.val_batch is not None:
                    val_loss, val_metrics = self.evaluate()
                    if val_loss < self.best_val_loss and self.step > 0:  # step 0 saves no checkpoint to name
                        self.best_val_loss, self.best_step = val_loss, self.step
                    best = f" (best {self.best_val_loss:.4f} at step {self.best_step})" if self.best_step > 0 else ""
                    if self.val_text:  # bits per byte compare across tokenizers
                        val_metrics = {"bpb": bits_per_byte(val_loss, *self.val_text), **val_metrics}
                    extra = "".join(f" | val {k} {v:.4f}" for k, v in val_metrics.items())
                    log(f"step {self.step}: val loss {val_loss:.4f}{extra}{best}")
                    self._record({"step": self.step, "val_loss": val_loss, "lr": lr_at(self.step, c),
                                  **{f"val_{k}": v for k, v in val_metrics.items()}, **self._clocks()})
                if self.on_eval is not None and self.master and self.mode in ("single", "ddp"):
                    self.raw_model.eval()
                    with torch.no_grad():  # generation runs in the weights' own dtype (its KV cache is in it)
                        self.on_eval(self)
                    self.raw_model.train()
                if self.step > 0:
                    self.save_checkpoint()
            if at_end:
                break
            if self.stop_signal:
                self.save_checkpoint(reason=f"stopped by {signal.Signals(self.stop_signal).name}")
                log(f"stopped at step {self.step}; continue with init_from=resume")
                bar.close()
                raise SystemExit(128 + self.stop_signal)
            t0, tokens0 = time.time(), self.tokens_seen
            lr = lr_at(self.step, c)
            loss, norm, extras, skipped = self.train_step()
            dt = time.time() - t0
            if hasattr(self.train_batch, "metrics"):  # a batch source's own figures (rl.py: rewards, rollout speed)
                extras = {**extras, **self.train_batch.metrics(dt)}
            self.train_time += dt
            interval_time += dt
            interval_tokens += self.tokens_seen - tokens0
            bar.update(1)
            if skipped:
                nan_in_row += 1
                self.nan_skips_total += 1
                log(f"step {self.step}: non-finite loss {loss} / grad norm {norm}: step skipped "
                    f"({nan_in_row} in a row, {self.nan_skips_total} in all)")
                if nan_in_row >= c.max_nan_skips:
                    raise SystemExit(f"aborting: {nan_in_row} non-finite losses in a row (max_nan_skips="
                                     f"{c.max_nan_skips}); lower learning_rate, use bfloat16 instead of float16, or "
                                     "check the data")
            else:
                nan_in_row = 0
            if self.step % c.log_interval == 0 or self.step == c.max_iters:
                tok_s = interval_tokens / max(interval_time, 1e-9)
                flops = self.raw_model.flops_per_token(self.seq_len) if hasattr(self.raw_model, "flops_per_token") else 0
                mfu = flops * tok_s / (peak * self.world) if peak else 0.0
                eta = (c.max_iters - self.step) * interval_time / c.log_interval
                extra = "".join(f" | {k} {v:.4f}" for k, v in extras.items())
                speed = f"{tok_s / 1e3:.1f}k" if tok_s >= 1e3 else f"{tok_s:.0f}"  # a 135M model on CPU: tens
                log(f"step {self.step}/{c.max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                    f"{speed} tok/s | MFU {100 * mfu:.1f}%{extra} | ETA {eta / 60:.1f} min")
                bar.set_postfix(loss=f"{loss:.3f}")
                self._record({"step": self.step, "train_loss": loss, "lr": lr, "grad_norm": norm,
                              "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 5),
                              **self._clocks(), **extras})
                interval_time, interval_tokens = 0.0, 0
        bar.close()
        self.export_model()
        if self.master:
            plot_losses(self.metrics_path, os.path.join(self.c.out_dir, "loss.png"))
            if self.nan_skips_total:
                log(f"{self.nan_skips_total} steps were skipped for non-finite losses")
            best = f"; best val loss {self.best_val_loss:.4f} at step {self.best_step}" if self.best_step > 0 else ""
            log(f"done: {self.step} steps, {self.tokens_seen / 1e6:.2f}M tokens, {time.time() - self.t_start:.1f}s{best}")
        if self.wandb is not None:
            self.wandb.finish()

