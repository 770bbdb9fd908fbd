"""Checkpoint files on disk: atomic publication, pruning, and the RNG states that make a resume bit-exact.

A checkpoint is a folder out_dir/ckpt/step_NNNNNNNN. The trainer writes everything into step_NNNNNNNN.tmp, then
publish() fsyncs it and renames it into place, so a kill at any moment leaves either the old set of checkpoints or
the new one, never half of one. What goes inside (model, optimizer, sharded DCP or DeepSpeed files, state.pt) is
the trainer's business (trainer.Trainer.save_checkpoint). build_model() is where a run starts: a fresh model, a
model folder or .gguf, another run's out_dir or checkpoint, or this run's own to resume; extend_context() then
stretches its rotary positions to a longer context.
"""
import glob
import json
import os
import random
import shutil

from dataclasses import fields

import numpy as np
import torch

from metrics import log
from model import ModelConfig, Transformer


def rng_state():
    """This process's RNG states as tensors and primitives, so torch.load(weights_only=True) can read them."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def fsync_tree(path):
    """Flush every file under `path` (and the directories) to disk before the checkpoint is made visible."""
    for root, _, files in os.walk(path):
        for name in files + ["."]:
            fsync(os.path.join(root, name))


def atomic_write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dirs(out_dir):
    """Complete checkpoints (a checkpoint becomes visible only by the final rename), oldest first."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt", "step_*")) if not d.endswith(".tmp"))


def latest_checkpoint(out_dir):
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_trainer_state(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=True)


def publish(tmp, final):
    """Make a fully written checkpoint folder visible under its final name (replacing one of the same step)."""
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync(os.path.dirname(final))  # the rename itself


def prune(out_dir, keep_last, keep=()):
    """Delete all checkpoints but the newest `keep_last` and those named in `keep` (the best, the one just made)."""
    dirs = checkpoint_dirs(out_dir)
    keep = set(keep) | (set(dirs[-keep_last:]) if keep_last > 0 else set())
    for d in dirs:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


def build_model(init_from, out_dir, scratch_config=None):
    """(model, tokenizer) a run starts from; the tokenizer is None where the model brings none (a fresh model takes
    the data's). scratch: Transformer(scratch_config); a model folder or .gguf: its weights in fp32 (master
    weights, whatever is stored); resume: what the newest checkpoint's run started from (its frozen weights, as
    LoRA needs) or, for a run that trained every weight, the checkpoint's architecture. Trainer.fit then loads the
    checkpoint's weights."""
    if init_from == "scratch":
        if scratch_config is None:
            raise SystemExit("init_from=scratch: this script fine-tunes a model; name its folder or .gguf")
        return Transformer(scratch_config), None
    if init_from == "resume":
        path = latest_checkpoint(out_dir)
        if path is None:
            raise SystemExit(f"init_from=resume: no checkpoint in {out_dir}/ckpt")
        state = read_trainer_state(path)
        source = state.get("model_source", "scratch")
        if source != "scratch" and (state.get("frozen") or os.path.exists(source)):
            log(f"init_from=resume: the model is rebuilt from {source}, then {path} is loaded onto it")
            return build_model(source, out_dir)
        saved = ModelConfig(**state["model_config"])
        if scratch_config is not None:
            ignored = [f"{f.name}={getattr(scratch_config, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
                       for f in fields(ModelConfig) if getattr(scratch_config, f.name) != getattr(saved, f.name)
                       and f.name not in ("vocab_size", "bos_id", "eos_id")]
            if ignored:
                log(f"init_from=resume: the model's shape comes from {path}; ignored: {', '.join(ignored)}")
        return Transformer(saved), None
    if not os.path.exists(init_from):
        raise SystemExit(f"init_from={init_from}: no such model folder or .gguf (or use scratch / resume)")
    if os.path.isdir(os.path.join(init_from, "ckpt")):  # a training run's out_dir: its newest checkpoint
        init_from = latest_checkpoint(init_from) or init_from
    if os.path.isfile(os.path.join(init_from, "state.pt")):
        return _from_trainer_checkpoint(init_from)
    import convert
    from tokenizer import Tokenizer, tokenizer_in
    try:
        model = convert.from_pretrained(init_from, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as e:  # the loader's message names the file
        raise SystemExit(f"init_from={init_from}: {e}") from None
    has_tokenizer = tokenizer_in(init_from)
    if not has_tokenizer:
        log(f"warning: {init_from} holds no tokenizer: the data's tokenizer is NOT checked against the model's")
    return model, Tokenizer.from_pretrained(init_from) if has_tokenizer else None


EXTENSIONS = ("linear", "dynamic", "yarn")


def original_context(config):
    """The context a model was trained at before any RoPE scaling (what a scaling's factor is relative to)."""
    s = config.rope_scaling or {}
    kind = s.get("rope_type")
    if kind in ("yarn", "llama3"):
        return s.get("original_max_position_embeddings", config.max_seq_len)
    if kind == "linear":
        return round(config.max_seq_len / s["factor"])
    return config.max_seq_len  # none; dynamic NTK grows from max_seq_len (transformers' max_position_embeddings)


def extend_context(model, rope_scaling, extend_to):
    """Scale model's rotary embeddings so it reads extend_to tokens, as transformers' rope_scaling does, in place;
    the config carries it into every checkpoint, hf/ export, quantized folder and GGUF. rope_scaling: linear
    (position interpolation: every position divided by the factor), dynamic (NTK: the base grows with the sequence
    once it passes max_seq_len, which stays the trained length, as transformers' max_position_embeddings) or yarn
    (interpolated low frequencies, kept high ones, attention temperature 0.1 ln(factor) + 1). The factor is extend_to
    over the context the model was first trained at, so extending an extended model again, or a resumed run, restates
    the same scaling instead of stacking a second one. Neither set: the model is left as it is. Returns the config's
    rope_scaling."""
    if not rope_scaling and not extend_to:
        return model.config.rope_scaling
    if rope_scaling not in EXTENSIONS or extend_to <= 0:
        raise SystemExit(f"rope_scaling={rope_scaling!r}: expected one of {', '.join(EXTENSIONS)} (with extend_to)")
    c = model.config
    old = original_context(c)
    if extend_to <= old:
        raise SystemExit(f"extend_to={extend_to}: must exceed the context the model was trained at ({old})")
    factor = extend_to / old
    scaling = {"rope_type": rope_scaling, "factor": factor}
    if rope_scaling == "yarn":
        scaling["original_max_position_embeddings"] = old
    if c.rope_scaling != scaling:
        log(f"context: {old} -> {extend_to} tokens by {rope_scaling} RoPE scaling (factor {factor:g})")
    c.rope_scaling = scaling
    c.max_seq_len = old if rope_scaling == "dynamic" else extend_to
    return scaling


def _from_trainer_checkpoint(path):
    """(model, tokenizer) of a checkpoint folder a training run wrote (ckpt/step_N): its weights, and the tokenizer
    of the data it trained on."""
    state = read_trainer_state(path)
    if state.get("frozen"):
        raise SystemExit(f"{path}: a checkpoint of adapters, not of a whole model; start from its run's hf/ folder")
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    from tokenizer import Tokenizer, tokenizer_in
    data_dir = state["config"].get("data_dir", "")
    has_tokenizer = bool(data_dir) and tokenizer_in(data_dir)
    if not has_tokenizer:
        log(f"warning: {path}: its run's data_dir {data_dir!r} holds no tokenizer: the data is NOT checked")
    log(f"init_from: the weights of {path} (step {state['step']})")
    return model, Tokenizer.from_pretrained(data_dir) if has_tokenizer else None
