"""Run a test body on several CPU processes joined by a gloo process group (127.0.0.1 only)."""

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


def _entry(rank: int, world: int, port: int, body, args: tuple) -> None:
    # Environment as torchrun sets it: transformers' tensor parallelism reads it.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(body, world: int = 2, *args) -> None:
    """`body(rank, world, *args)` on `world` spawned processes; a failure on any rank raises
    here with that rank's traceback. `body` must be a module-level function."""
    mp.spawn(_entry, args=(world, free_port(), body, args), nprocs=world, join=True)
