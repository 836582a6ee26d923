"""Process-wide state of a run: the device, CPU threads, seeds, the RNG states, and the
ranks of a run launched by torchrun / accelerate (:class:`World`, :func:`init_distributed`).

RNG states are saved without pickle: the torch (and CUDA) generator states are byte
tensors (safetensors), Python's and NumPy's Mersenne Twister states are lists of ints
(JSON). :func:`rng_state` returns both halves; :func:`set_rng_state` takes them back.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import random
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cpo_fast.distributed import World, current_world, launcher_env, max_over_ranks
from cpo_fast.pipeline.run.config import RunConfig


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


def release_free_memory() -> None:
    """Hand the memory freed so far back to the OS: glibc keeps freed heap pages mapped, and
    the set-up stages free about 0.6 GB (SmolLM2, 2,000 rows) that training would otherwise
    count on top of its own peak. A no-op where the C library is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


# --------------------------------------------------------------------------- several processes
# `torchrun --nproc_per_node=N -m cpo_fast train ...` and `accelerate launch -m cpo_fast train`
# set RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) in each process's environment.
# init_distributed() reads them and joins the process group (gloo on the CPU, NCCL on CUDA);
# without them (or with WORLD_SIZE=1) everything below is the one-process no-op.


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


def is_main() -> bool:
    """True on rank 0 (and without a launcher): the one process that writes files."""
    return current_world().is_main


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


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
