"""Process groups for the trainer: one process, or several started by torchrun / the deepspeed launcher.

setup_distributed() starts a group when the launcher started several processes, or when FSDP / DeepSpeed are asked
for (they need one even alone: a group of one on a free local port). gloo on CPU, nccl on GPUs.
"""
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


