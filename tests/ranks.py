"""Run a function on N local processes that join one gloo group (CPU multi-process tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

WORKER_TIMEOUT_S = 300  # the workers take seconds; a hang (e.g. a gloo rendezvous) fails the test instead
WORKER_THREADS = 1  # torch threads per worker (two workers share the 2-core machine)


@contextlib.contextmanager
def worker_threads() -> Iterator[None]:
    """Run the block on as many torch threads as each worker: with another count the float sums of the matmuls go
    in another order, so a one-process reference can differ from the workers' results in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` on ``world`` processes in one gloo group; fails the test on an error or a hang.

    Forks where the OS can (the workers inherit this process's imports and objects: seconds instead of about 40 s
    of imports per spawned interpreter on a 2-core machine), else spawns (``fn`` and ``args`` must then pickle)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(
        _entry, args=(fn, world, _free_port(), args), nprocs=world, join=False, start_method=method
    )
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} gloo workers did not finish within {WORKER_TIMEOUT_S} s (killed)")
