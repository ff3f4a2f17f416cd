"""Run a test body on several processes joined by a process group on 127.0.0.1: gloo on CPU,
or NCCL with one GPU per rank."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, body, args: tuple) -> None:
    # Environment as torchrun sets it: transformers' tensor parallelism reads it.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(body, world: int = 2, *args, backend: str = "gloo") -> None:
    """`body(rank, world, *args)` on `world` spawned processes ("nccl": rank r on GPU r); a
    failure on any rank raises here with that rank's traceback. `body` must be a module-level
    function."""
    mp.spawn(_entry, args=(world, free_port(), backend, body, args), nprocs=world, join=True)
