"""Devices, seeds and ranks (cpo_fast/pipeline/run/runtime.py): the RNG state a checkpoint
stores round-trips through JSON + tensors, one process needs no process group, and on two
ranks a failure of rank 0 inside ``main_first`` stops the other rank instead of hanging."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from _dist import leave_process_group, spawn_ranks

from cpo_fast.distributed import SINGLE, World
from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.runtime import (
    RankFailed,
    barrier,
    broadcast_params,
    is_main,
    main_first,
    pick_device,
    release_free_memory,
    rng_state,
    seed_everything,
    set_rng_state,
)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seeds_and_the_rng_state_round_trip():
    seed_everything(3)
    a = _draws()
    seed_everything(3)
    assert _draws() == a
    meta, tensors = rng_state()
    meta = json.loads(json.dumps(meta))  # what state.json holds
    after = _draws()
    set_rng_state(meta, tensors)
    assert _draws() == after


def test_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    try:
        assert pick_device(RunConfig(device="cpu", threads=1)) == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert is_main()
    with main_first("the stages"):
        ran = True
    assert ran
    p = torch.ones(2)
    barrier(SINGLE)
    broadcast_params([p], SINGLE)
    assert torch.equal(p, torch.ones(2))
    release_free_memory()


def _worker(rank: int, world: int, port: int, payload, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    p = torch.full((2,), float(rank))
    broadcast_params([p], World(rank, world))
    got = {"param": p.tolist()}
    try:
        with main_first("f_0"):
            if rank == 0:
                raise OSError("disk full")
            got["ran"] = True
    except RankFailed as e:
        got["error"] = str(e)
    except OSError as e:
        got["error"] = f"own: {e}"
    q.put((rank, got))
    leave_process_group()


def test_rank_zero_failing_in_main_first_stops_the_others():
    res = spawn_ranks(_worker, 2, None, timeout=120)
    assert res[0] == {"param": [0.0, 0.0], "error": "own: disk full"}
    assert res[1] == {"param": [0.0, 0.0],
                      "error": "rank 0 failed while building f_0; see its error."}
