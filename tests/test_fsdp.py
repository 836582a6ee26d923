"""The fused-linear op under FSDP2 (fully_shard) on 2 gloo CPU ranks: a sharded lm_head
weight (a DTensor) is gathered inside the op, and the sharded gradients equal the
unsharded single-process ones."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import free_port

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 30, bias=False)).double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (6,), generator=g)
    labels[2] = -100
    return x, labels


def _loss(model, weight) -> torch.Tensor:
    import cpo_fast

    x, labels = _inputs()
    logp = cpo_fast.linear_token_logprobs(model[0](x), weight, labels, backend="reference")
    return -(logp * torch.linspace(0.5, 1.5, 6, dtype=torch.float64)).sum()


def _worker(rank: int, port: int, q) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        fully_shard(model[0])
        fully_shard(model[1])
        fully_shard(model)
        w = model[1].weight
        assert hasattr(w, "full_tensor"), type(w)  # the op really receives a DTensor
        _loss(model, w).backward()
        q.put((rank, w.grad.full_tensor().tolist(), model[0].weight.grad.full_tensor().tolist()))
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head_matches_unsharded():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (a, b)) for r, a, b in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    model = _model()
    _loss(model, model[1].weight).backward()
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(results[rank][0], dtype=torch.float64),
                                   model[1].weight.grad)
        torch.testing.assert_close(torch.tensor(results[rank][1], dtype=torch.float64),
                                   model[0].weight.grad)
