"""Process-wide state of a run: the device, CPU threads, seeds, the RNG states, and the
ranks of a run launched by torchrun / accelerate (:class:`World`, :func:`init_distributed`).

RNG states are saved without pickle: the torch (and CUDA) generator states are byte
tensors (safetensors), Python's and NumPy's Mersenne Twister states are lists of ints
(JSON). :func:`rng_state` returns both halves; :func:`set_rng_state` takes them back.
"""

from __future__ import annotations

import atexit
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cpo_fast.pipeline.config import RunConfig


def pick_device(cfg: RunConfig) -> torch.device:
    """The run's device; under a launcher this also joins the process group, and a CUDA
    device is the one of this process's LOCAL_RANK."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = init_distributed(device.type)
    if device.type == "cuda" and device.index is None and world.distributed:
        device = torch.device("cuda", world.local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch/CUDA generator states as tensors)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng.torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch generator state (and ``device``'s CUDA one): replayed by :func:`rng_replay`
    so that a second forward pass draws the same dropout masks as the first."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def rng_replay(snap: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.random.set_rng_state(snap[0])
    if snap[1] is not None:
        torch.cuda.set_rng_state(snap[1], device)


# --------------------------------------------------------------------------- several processes
# `torchrun --nproc_per_node=N -m cpo_fast train ...` and `accelerate launch -m cpo_fast train`
# set RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) in each process's environment.
# init_distributed() reads them and joins the process group (gloo on the CPU, NCCL on CUDA);
# without them (or with WORLD_SIZE=1) everything below is the one-process no-op.


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launcher_env() -> World:
    """The ranks a launcher (torchrun, accelerate launch) announced in the environment."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1") or 1)
    return World(int(env.get("RANK", "0") or 0), size, int(env.get("LOCAL_RANK", "0") or 0))


def init_distributed(device_type: str = "cpu") -> World:
    """Join the launcher's process group once (idempotent); the :data:`SINGLE` world without one.

    The timeout of every collective is ``CPO_FAST_DIST_TIMEOUT`` seconds (default 7200): the
    other ranks wait in one while rank 0 builds the shared stages (f_0's SFT included).
    """
    env = launcher_env()
    if not env.distributed or not dist.is_available():
        return current_world()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("CPO_FAST_DIST_TIMEOUT", 7200)))
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(_destroy)
    return current_world()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    """The process group's ranks (the :data:`SINGLE` world when none is initialized)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), launcher_env().local_rank)
    return SINGLE


def is_main() -> bool:
    """True on rank 0 (and without a launcher): the one process that writes files."""
    return current_world().is_main


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def max_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise max over ranks (identity on one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity on one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t)
    return t.tolist()


class RankFailed(ValueError):
    """Rank 0 failed in a stage the other ranks were waiting for (its own error says why)."""


@contextmanager
def main_first(what: str):
    """Rank 0 runs the block first while the other ranks wait; then they run it, and find
    what rank 0 built (files under --output-dir) instead of building it again. If rank 0
    fails (or is interrupted), the others stop too instead of hanging."""
    world = current_world()
    if not world.distributed:
        yield
        return
    if not world.is_main:
        failed = max_over_ranks(world, [0.0, 0.0])
        if failed[1]:
            raise KeyboardInterrupt
        if failed[0]:
            raise RankFailed(f"rank 0 failed while building {what}; see its error.")
        yield
        return
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        max_over_ranks(world, [0.0, 1.0])
        raise e
    except BaseException:
        max_over_ranks(world, [1.0, 0.0])
        raise
    max_over_ranks(world, [0.0, 0.0])


def broadcast_params(params: list[torch.Tensor], world: World) -> None:
    """Every rank starts from rank 0's trainable parameters."""
    if world.distributed:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.Tensor], world: World, bucket_numel: int = 1 << 24) -> None:
    """All-reduce the accumulated gradients and divide by the world size (what DDP does),
    in flat buckets; a parameter without a gradient on this rank contributes zeros."""
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    for i, p in enumerate(params):
        bucket.append(p)
        if sum(q.numel() for q in bucket) >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            flat /= world.size
            for q, g in zip(bucket, torch.split(flat, [q.numel() for q in bucket]), strict=True):
                q.grad.copy_(g.view_as(q.grad))
            bucket = []
