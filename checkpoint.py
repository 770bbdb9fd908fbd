"""Checkpoint files on disk: atomic publication, pruning, and the RNG states that make a resume bit-exact.

A checkpoint is a folder out_dir/ckpt/step_NNNNNNNN. The trainer writes everything into step_NNNNNNNN.tmp, then
publish() fsyncs it and renames it into place, so a kill at any moment leaves either the old set of checkpoints or
the new one, never half of one. What goes inside (model, optimizer, sharded DCP or DeepSpeed files, state.pt) is
the trainer's business (trainer.Trainer.save_checkpoint).
"""
import glob
import json
import os
import random
import shutil

import numpy as np
import torch


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
