"""What a training run reports: log lines (rank 0 only), metrics.jsonl records read back tolerantly, the loss plot,
Weights & Biases, the peak FLOP/s that MFU is measured against, and the process's memory (for the benchmarks)."""
import ctypes
import functools
import json
import os
import sys

import torch


def log(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        from tqdm import tqdm
        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
        sys.stdout.flush()


# Dense bf16 peak FLOP/s per device. This CPU: AMD EPYC (Zen 4, AVX512-BF16), a 4096x4096 bf16 matmul measured
# 410 GFLOP/s with 2 threads (fp32: 185), so about 2.05e11 per thread; other CPUs: set peak_flops.
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
CPU_PEAK_FLOPS_PER_THREAD = 2.05e11


def default_peak_flops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    return CPU_PEAK_FLOPS_PER_THREAD * torch.get_num_threads()


def read_metrics(path):
    """The records of a metrics.jsonl; a line a kill cut short (or any unreadable one) is dropped with a warning
    naming it, so it never stops a resume."""
    recs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "step" not in rec:
                    raise ValueError("not a record with a step")
                recs.append(rec)
            except ValueError:
                log(f"warning: {path}:{n}: unreadable metrics line dropped ({line.strip()[:60]!r})")
    return recs


def start_wandb(c, cfg):
    """The wandb module, initialised for this run, or None when c.wandb_mode is off."""
    if c.wandb_mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("wandb_mode is not 'off' but the wandb package is not installed (pip install wandb)")
    wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=cfg, mode=c.wandb_mode, dir=c.out_dir)
    return wandb


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(7, 4))


def _curve(ax, recs, key, **style):
    """key against the step, over the records that have it (none: nothing drawn)."""
    pts = [(r["step"], r[key]) for r in recs if key in r]
    if pts:
        ax.plot(*zip(*pts), **style)


def _save(fig, ax, path):
    import matplotlib.pyplot as plt
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_losses(metrics_path, path):
    """Train and val loss against the step, from metrics.jsonl, as a PNG."""
    recs = read_metrics(metrics_path)
    fig, ax = _figure()
    for key in ("train_loss", "val_loss"):
        _curve(ax, recs, key, label=key.replace("_", " "), marker="o" if key == "val_loss" else None)
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    if any("rewards/accuracies" in r or "val_rewards/accuracies" in r for r in recs):  # DPO, on a second axis
        right = ax.twinx()
        for key, style in (("rewards/accuracies", ":"), ("val_rewards/accuracies", "--")):
            _curve(right, recs, key, linestyle=style, marker="o" if key.startswith("val") else None, label=key,
                   color="C2")
        right.set_ylabel("reward accuracy")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    _save(fig, ax, path)


def plot_rewards(metrics_path, path):
    """rl.py's reward (mean over each step's completions) and eval_pass@1 against the step, from metrics.jsonl."""
    recs = read_metrics(metrics_path)
    fig, ax = _figure()
    for key in ("reward", "eval_pass@1"):
        _curve(ax, recs, key, label=key, marker="o" if key == "eval_pass@1" else None)
    ax.legend()
    _save(fig, ax, path)
    log(f"loss curve: {path}")


def rss_mb():
    """This process's resident memory now, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """glibc with mallinfo2 (>= 2.33), or None (another libc, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


def trim_heap():
    """Give back to the OS the memory malloc keeps after frees (glibc's malloc_trim; a no-op elsewhere). Batches of
    many widths (DPO's reference pass) otherwise leave 0.5-0.7 GB of SmolLM2's freed activations resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def heap_mb():
    """The bytes malloc has handed out and not had back, in MB (None without glibc): on CPU, the closest thing to
    torch.cuda.memory_allocated. Unlike RSS it leaves out the libraries' code and the freed memory malloc keeps for
    reuse, and it includes every tensor (torch's CPU allocator is malloc)."""
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20
