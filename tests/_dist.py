"""Helpers for the tests that start several gloo processes on this machine."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """End a rank's gloo process group before its process exits.

    A process group left to the interpreter's exit can abort the rank ("terminate called
    without an active exception", SIGABRT) while gloo's threads are torn down; CI saw it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # neither rank closes its sockets while the other still talks
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[..., None], world: int, payload: Any,
                timeout: float = 300) -> dict:
    """Run ``worker(rank, world, port, payload, queue)`` in ``world`` spawned processes; each
    puts one ``(key, value)`` on the queue and should end with :func:`leave_process_group`.
    Returns the dict of what they put; a rank that exits non-zero fails the test."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, payload, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes} (negative: killed by that signal)"
    return results
