"""Checkpoint files on disk: atomic publication, pruning, and the RNG states that make a resume bit-exact.

A checkpoint is a folder out_dir/ckpt/step_NNNNNNNN. The trainer writes everything into step_NNNNNNNN.tmp, then
publish() fsyncs it and renames it into place, so a kill at any moment leaves either the old set of checkpoints or
the new one, never half of one. What goes inside (model, optimizer, sharded DCP or DeepSpeed files, state.pt) is
the trainer's business (trainer.Trainer.save_checkpoint). build_model() is where a run starts: a fresh model, a
model folder or .gguf, another run's out_dir or checkpoint, or this run's own to resume; extend_context() then
stretches its rotary positions to a longer context.

What keeps runs from losing or mixing work: check_out_dir(), run_in() / remove_run() (a new run never lands on
another one unless told to), check_same_kind() (a resume continues a run of its own kind), data_fingerprint() (a
checkpoint records what it trained on), files.json in every checkpoint (each file's size, so one cut short is found
without reading it), resume_checkpoint() (the newest checkpoint that reads back, damaged ones named and passed
over) and load_tensors() (a checkpoint holding pickled objects is refused).
"""
import glob
import hashlib
import json
import os
import pickle
import random
import re
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


class Damaged(SystemExit):
    """A checkpoint file that does not read back (cut short, corrupt, missing). A SystemExit, so where nothing
    falls back past it the run stops with its one line."""


def load_tensors(path):
    """torch.load(weights_only=True) of a file the trainer wrote. A file holding other Python objects is refused
    (unpickling them could run code, and this trainer's checkpoints hold none); one cut short or corrupt raises
    Damaged. Both name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found[1] if found else "not loadable as weights"
        raise SystemExit(f"{path}: holds Python objects besides tensors ({what}): refused, as loading it could run "
                         f"code; use a checkpoint this trainer wrote, or delete it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise Damaged(f"{path}: unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def read_trainer_state(ckpt_dir):
    return load_tensors(os.path.join(ckpt_dir, "state.pt"))


SIZES = "files.json"  # in each checkpoint: {file: bytes} as written


def file_sizes(folder):
    return {os.path.relpath(os.path.join(root, n), folder): os.path.getsize(os.path.join(root, n))
            for root, _, names in os.walk(folder) for n in names if n != SIZES}


def damage(ckpt_dir):
    """What is wrong with a checkpoint, seen without reading it: a file missing or of another size than it was
    written with (files.json); None when nothing is (or it predates files.json)."""
    path = os.path.join(ckpt_dir, SIZES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            written = json.load(f)
    except (OSError, ValueError):
        return f"{path}: unreadable"
    now = file_sizes(ckpt_dir)
    for name, size in written.items():
        if now.get(name) != size:
            return f"{os.path.join(ckpt_dir, name)}: " + (
                "missing" if name not in now else f"{now[name]:,} bytes, written with {size:,} (cut short?)")
    return None


_named = set()  # damaged checkpoints already named: build_model and the trainer both look


def _pass_over(ckpt_dir, problem):
    if ckpt_dir not in _named:
        _named.add(ckpt_dir)
        log(f"warning: {problem}: checkpoint {ckpt_dir} is damaged; going back to the one before it")


def latest_checkpoint(out_dir):
    """The newest checkpoint whose files are all there at their written sizes (damaged ones are named)."""
    for d in reversed(checkpoint_dirs(out_dir)):
        problem = damage(d)
        if problem is None:
            return d
        _pass_over(d, problem)
    return None


def resume_checkpoint(out_dir):
    """(path, trainer state) of the newest checkpoint in out_dir that reads back: its files at their written
    sizes, state.pt and every rank's RNG state loadable. A damaged newer one is named and passed over; one holding
    pickled objects stops the run (load_tensors)."""
    dirs = checkpoint_dirs(out_dir)
    if not dirs:
        raise SystemExit(f"init_from=resume: no checkpoint in {out_dir}/ckpt")
    for d in reversed(dirs):
        try:
            problem = damage(d)
            if problem:
                raise Damaged(problem)
            for rng in glob.glob(os.path.join(d, "rng_rank*.pt")):
                load_tensors(rng)
            return d, read_trainer_state(d)
        except Damaged as e:
            _pass_over(d, e)
    raise SystemExit(f"init_from=resume: no checkpoint in {out_dir}/ckpt reads back (each is named above); start "
                     f"over with --overwrite=True")


def publish(tmp, final):
    """Make a fully written checkpoint folder visible under its final name (replacing one of the same step)."""
    with open(os.path.join(tmp, SIZES), "w") as f:
        json.dump(file_sizes(tmp), f, indent=1)
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


# what a training run writes in its out_dir: the trainer's files, its exports (LoRA: adapter/), wandb's and DPO's
# reference cache
RUN_FILES = ("ckpt", "metrics.jsonl", "config.json", "loss.png", "reward.png", "hf", "adapter", "wandb", "ref_logps_*")


def check_out_dir(out_dir, init_from, overwrite):
    """Before a run writes anything: it never lands on another run in out_dir unless told to (overwrite), and never
    writes into the folder of the model it starts from."""
    if overwrite and init_from == "resume":
        raise SystemExit("overwrite=True and init_from=resume: a resume continues the run in out_dir; drop one")
    if init_from not in ("", "scratch", "resume"):  # overwriting, or even exporting, would destroy the model
        out, source = os.path.realpath(out_dir), os.path.realpath(init_from)
        if source == out or source.startswith(os.path.join(out, "")):
            raise SystemExit(f"out_dir={out_dir} holds the model this run starts from (init_from={init_from}), "
                             f"which the run would overwrite: write to another --out_dir")
    found = run_in(out_dir) if init_from != "resume" else ""
    if found and not overwrite:
        raise SystemExit(f"out_dir={out_dir} holds another run ({found}): continue it with --init_from=resume, "
                         f"start over with --overwrite=True (its files are removed), or choose another --out_dir")


def check_same_kind(path, state, kind, out_dir):
    """A resume continues a run of the same kind (the data's format): a pretraining run's checkpoints do not go on
    as SFT, nor SFT's as DPO (checkpoints from before the kind was recorded are not checked)."""
    saved = state.get("kind")
    if saved and kind and saved != kind:
        raise SystemExit(f"init_from=resume: {path} is a checkpoint of a {saved} run and this run is {kind} (its "
                         f"data's format); start a new run from it with --init_from={out_dir} and another --out_dir")


def run_in(out_dir):
    """What shows that out_dir holds a training run: its checkpoints, a metrics.jsonl with records ('' if none)."""
    found = [f"{len(checkpoint_dirs(out_dir))} checkpoint(s)"] if checkpoint_dirs(out_dir) else []
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        found.append("metrics.jsonl")
    return ", ".join(found)


def remove_run(out_dir):
    """overwrite=True: the files and folders of the run in out_dir go (RUN_FILES); anything else there stays, and
    a folder that holds no run (run_in) is left as it is (a config.json there may be a model's)."""
    if not run_in(out_dir):
        return
    gone = sorted(p for pattern in RUN_FILES for p in glob.glob(os.path.join(out_dir, pattern)))
    for p in gone:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
    if gone:
        log(f"overwrite=True: removed the previous run's {', '.join(os.path.basename(p) for p in gone)} from {out_dir}")


BLOCKS, BLOCK = 16, 1 << 16


def data_fingerprint(data_dir):
    """What a checkpoint records of its data: the folder and a sha256 of its token files (*.bin, *.npy), each one's
    name, size and 16 blocks of 64 KiB spread over it (the whole file up to 1 MiB). It reads at most 1 MiB a
    file however large, survives a copy or a move (no mtimes) and ignores meta.json's timings; a re-tokenized
    corpus changes sizes or sampled bytes (an edit that keeps every size and falls between the blocks goes unseen)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(data_dir, "*.bin")) + glob.glob(os.path.join(data_dir, "*.npy"))):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)} {size}\n".encode())
        with open(path, "rb") as f:
            for k in range(BLOCKS):
                f.seek(k * max(0, size - BLOCK) // (BLOCKS - 1))
                h.update(f.read(BLOCK))
    return {"data_dir": os.path.abspath(data_dir), "checksum": h.hexdigest()}


def build_model(init_from, out_dir, scratch_config=None):
    """(model, tokenizer) a run starts from; the tokenizer is None where the model brings none (a fresh model takes
    the data's). scratch: Transformer(scratch_config); a model folder or .gguf: its weights in fp32 (master
    weights, whatever is stored); resume: what the newest checkpoint that reads back (resume_checkpoint) started
    from (its frozen weights, as LoRA needs) or, for a run that trained every weight, the checkpoint's
    architecture. Trainer.fit then loads the checkpoint's weights."""
    if init_from == "scratch":
        if scratch_config is None:
            raise SystemExit("init_from=scratch: this script fine-tunes a model; name its folder or .gguf")
        return Transformer(scratch_config), None
    if init_from == "resume":
        path, state = resume_checkpoint(out_dir)
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
    from tokenizer import load_tokenizer, tokenizer_in
    try:
        model = convert.from_pretrained(init_from, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as e:  # the loader's message names the file
        raise SystemExit(f"init_from={init_from}: {e}") from None
    has_tokenizer = tokenizer_in(init_from)
    if not has_tokenizer:
        log(f"warning: {init_from} holds no tokenizer: the data's tokenizer is NOT checked against the model's")
    return model, load_tokenizer(init_from) if has_tokenizer else None


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
    from tokenizer import load_tokenizer, tokenizer_in
    data_dir = state["config"].get("data_dir", "")
    has_tokenizer = bool(data_dir) and tokenizer_in(data_dir)
    if not has_tokenizer:
        log(f"warning: {path}: its run's data_dir {data_dir!r} holds no tokenizer: the data is NOT checked")
    log(f"init_from: the weights of {path} (step {state['step']})")
    return model, load_tokenizer(data_dir) if has_tokenizer else None
