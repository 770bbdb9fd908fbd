"""Process groups for the trainer: one process, or several started by torchrun / the deepspeed launcher.

setup_distributed() starts a group when the launcher started several processes, or when FSDP / DeepSpeed are asked
for (they need one even alone: a group of one on a free local port). gloo on CPU, nccl on GPUs.
deepspeed_engine() wraps a model and optimizer in a ZeRO engine whose batch, clipping and precision come from the
trainer's own settings.
"""
import json
import os
import socket

import torch
import torch.distributed as dist


def setup_distributed(parallel, device_name):
    """Start the process group when torchrun/deepspeed started several processes, or FSDP/DeepSpeed is asked
    for (they need one even alone). Returns (rank, world_size, device)."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 and parallel == "ddp":
        return 0, 1, torch.device(device_name)
    if "RANK" not in os.environ:  # one process without a launcher: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device(device_name)
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown_distributed():
    # the barrier first: gloo aborts intermittently when one rank tears down while another still talks
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()




def deepspeed_engine(model, optimizer, c, accum, dtype, device):
    """(engine, DeepSpeed's optimizer, ZeRO stage) from c.deepspeed_config, with batch_size, grad_accum (`accum`
    per process), grad_clip and dtype taken from the TrainConfig `c`, so they mean the same as without DeepSpeed."""
    try:
        import deepspeed
    except ImportError:
        raise SystemExit("parallel=deepspeed: the deepspeed package is not installed (pip install deepspeed)")
    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce on CPU (minutes, on first use) that only its
        # inference kernels call; training collectives go through torch.distributed (gloo) either way.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not os.path.isfile(c.deepspeed_config):
        raise SystemExit(f"deepspeed_config={c.deepspeed_config}: file not found (examples: config/ds_zero*.json)")
    with open(c.deepspeed_config) as f:
        ds_cfg = json.load(f)
    ours = {"train_micro_batch_size_per_gpu": c.batch_size, "gradient_accumulation_steps": accum,
            "train_batch_size": c.batch_size * c.grad_accum, "gradient_clipping": c.grad_clip}
    for key, value in ours.items():
        if key in ds_cfg and ds_cfg[key] != value:
            raise SystemExit(f"{c.deepspeed_config}: '{key}'={ds_cfg[key]} conflicts with this run's {value}; "
                             "remove it from the JSON and set batch_size / grad_accum / grad_clip instead")
        ds_cfg[key] = value
    ds_cfg["bf16"] = {"enabled": dtype == "bfloat16"}
    ds_cfg["fp16"] = {"enabled": dtype == "float16"}
    ds_cfg.setdefault("steps_per_print", 10 ** 9)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    return engine, optimizer, ds_cfg.get("zero_optimization", {}).get("stage", 0)
