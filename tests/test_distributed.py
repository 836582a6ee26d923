"""The distributed helper (cpo_fast/distributed.py) on its own: identities on one process,
and on two gloo ranks the rank-order gather of uneven row counts, the sums and maxima, the
DDP-style gradient average and the differentiable all-reduce. The effective batch built on
them is tested in tests/test_effective_batch.py."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import leave_process_group, spawn_ranks

from cpo_fast.distributed import (
    SINGLE,
    World,
    all_reduce_sum,
    average_gradients,
    current_world,
    distributed_flag,
    gather_rows,
    launcher_env,
    max_over_ranks,
    rng_replay,
    rng_snapshot,
    sum_over_ranks,
)


def test_one_process_collectives_are_identities():
    x = torch.arange(5.0)
    whole, mine = gather_rows(x, SINGLE)
    assert whole is x and mine == slice(0, 5)
    assert sum_over_ranks(SINGLE, [1.0, 2.0]) == [1.0, 2.0]
    assert max_over_ranks(SINGLE, [3.0]) == [3.0]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 4.0)
    average_gradients([p], SINGLE)
    assert torch.equal(p.grad, torch.full((2,), 4.0))
    assert current_world() == SINGLE and SINGLE.is_main and not SINGLE.distributed
    assert distributed_flag(None) is False and distributed_flag(False) is False
    with pytest.raises(ValueError, match="distributed=True but torch.distributed is not"):
        distributed_flag(True)


def test_launcher_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_env() == World(3, 4, 1)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert launcher_env() == SINGLE


def test_rng_replay_draws_the_same_dropout_mask():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    snap = rng_snapshot(torch.device("cpu"))
    first = drop(x)
    assert not torch.equal(drop(x), first)  # the generator moved on
    rng_replay(snap, torch.device("cpu"))
    assert torch.equal(drop(x), first)


def _worker(rank: int, world: int, port: int, payload, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = current_world()
    x = torch.arange(rank + 2, dtype=torch.float32) + 10 * rank  # 2 rows on rank 0, 3 on rank 1
    whole, mine = gather_rows(x, w)
    sums = sum_over_ranks(w, [1.0, float(rank)])
    maxs = max_over_ranks(w, [float(rank), -float(rank)])
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        b.grad = torch.full((2,), 4.0)  # rank 0 has no gradient for b: it counts as zeros
    average_gradients([a, b], w, bucket_numel=2)  # two buckets
    v = torch.tensor([float(rank + 1)], requires_grad=True)
    s = all_reduce_sum(v)
    (s * (rank + 1)).sum().backward()
    q.put((rank, dict(world=(w.rank, w.size), whole=whole.tolist(), mine=(mine.start, mine.stop),
                      sums=sums, maxs=maxs, a=a.grad.tolist(), b=b.grad.tolist(),
                      s=s.item(), v_grad=v.grad.item(), flag=distributed_flag(None))))
    leave_process_group()


def test_two_ranks():
    res = spawn_ranks(_worker, 2, None)
    for r in (0, 1):
        got = res[r]
        assert got["world"] == (r, 2) and got["flag"] is True
        assert got["whole"] == [0.0, 1.0, 10.0, 11.0, 12.0]  # rank order, uneven sizes
        assert got["mine"] == ((0, 2) if r == 0 else (2, 5))
        assert got["sums"] == [2.0, 1.0] and got["maxs"] == [1.0, 0.0]
        assert got["a"] == [1.5, 1.5, 1.5] and got["b"] == [2.0, 2.0]
        assert got["s"] == 3.0  # 1 + 2
        assert got["v_grad"] == 3.0  # d/dv_r of sum_k (k + 1) * (v_0 + v_1) = 1 + 2
