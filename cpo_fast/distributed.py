"""The ranks of a ``torch.distributed`` run as the library sees them, and the few collectives
it needs: gathers and sums of per-row scalars (the effective batch), a differentiable sum
(the global self-normalization) and DDP's gradient average. With no process group, or one
of a single rank, each is the one-process no-op.

Also the RNG snapshot that lets a second forward pass draw the first pass's dropout masks
(the two-pass effective-batch step replays it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


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


def current_world() -> World:
    """The process group's ranks (the :data:`SINGLE` world when none is initialized)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), launcher_env().local_rank)
    return SINGLE


def distributed_flag(flag: bool | None) -> bool:
    """An objective's ``distributed=`` argument resolved: None means "when a process group
    of more than one rank is up"; True without one is an error."""
    ready = current_world().distributed
    if flag and not ready:
        raise ValueError("distributed=True but torch.distributed is not initialized with >1 rank.")
    return ready if flag is None else bool(flag)


class _AllReduceSum(torch.autograd.Function):
    """Every rank's output depends on every rank's input, so the gradient of the summed
    per-rank losses is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over ranks, differentiable (a process group must be up)."""
    return _AllReduceSum.apply(x)


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity on one process)."""
    return _reduce(world, values, None)


def max_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise max over ranks (identity on one process)."""
    return _reduce(world, values, dist.ReduceOp.MAX if dist.is_available() else None)


def _reduce(world: World, values: list[float], op) -> list[float]:
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t, **({} if op is None else {"op": op}))
    return t.tolist()


def gather_rows(x: Tensor, world: World) -> tuple[Tensor, slice]:
    """Concatenate a 1-D tensor over ranks in rank order (sizes may differ).

    Returns the global tensor and the slice that holds this rank's rows.
    """
    if not world.distributed:
        return x, slice(0, x.shape[0])
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros(max(counts), device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    start = sum(counts[: world.rank])
    whole = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return whole, slice(start, start + counts[world.rank])


def average_gradients(params: list[Tensor], world: World, bucket_numel: int = 1 << 24) -> None:
    """All-reduce the accumulated gradients and divide by the world size (what DDP does),
    in flat buckets; a parameter without a gradient on this rank contributes zeros."""
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[Tensor] = []
    for i, p in enumerate(params):
        bucket.append(p)
        if sum(q.numel() for q in bucket) >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            flat /= world.size
            for q, g in zip(bucket, torch.split(flat, [q.numel() for q in bucket]), strict=True):
                q.grad.copy_(g.view_as(q.grad))
            bucket = []


def rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The torch generator state (and ``device``'s CUDA one): replayed by :func:`rng_replay`
    so that a second forward pass draws the same dropout masks as the first."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def rng_replay(snap: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.random.set_rng_state(snap[0])
    if snap[1] is not None:
        torch.cuda.set_rng_state(snap[1], device)
