"""The two-pass effective-batch gradient equals the full-batch gradient, on one process
with uneven micro-batches and on two gloo ranks (DDP averaging), for every scheme."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import spawn_ranks

from cpo_fast import dr_cpo_loss
from cpo_fast.distributed import current_world
from cpo_fast.effective_batch import row_coefficients, split_rows, surrogate
from cpo_fast.objectives import Objective

f64 = dict(dtype=torch.float64)
N_ROWS, N_DM, T, V, D = 8, 10, 5, 7, 4


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        tok=torch.randint(0, V, (N_ROWS, T), generator=g),
        tok_dm=torch.randint(0, V, (N_DM, T), generator=g),
        ref=torch.randn(N_ROWS, generator=g, **f64) - 8,
        ref_dm=torch.randn(N_DM, generator=g, **f64) - 8,
        y=torch.randn(N_ROWS, generator=g, **f64),
        ghat=torch.randn(N_ROWS, generator=g, **f64) * 0.5,
        ghat_dm=torch.randn(N_DM, generator=g, **f64) * 0.5,
        emb=torch.randn(V, D, generator=g, **f64),
        w0=torch.randn(V, D, generator=g, **f64) * 0.7,
    )


def _seq_logp(w: torch.Tensor, emb: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """s_i of a toy bigram model: sum_t log softmax(emb[x_t] @ w^T)[x_{t+1}]."""
    logits = emb[tok[:, :-1]] @ w.t()
    return torch.log_softmax(logits, -1).gather(-1, tok[:, 1:, None]).squeeze(-1).sum(-1)


def _loss_kwargs(method: str, d: dict, rows=slice(None), dm_rows=slice(None)) -> dict:
    kw: dict = {}
    if method == "dr_cpo":
        kw["outcome_pred"] = d["ghat"][rows]
    if method in ("dr_cpo", "oo_rlhf"):
        kw.update(dm_ref_logp=d["ref_dm"][dm_rows], dm_outcome_pred=d["ghat_dm"][dm_rows])
    return kw


def _full_grad(method: str, weighting: str, d: dict) -> torch.Tensor:
    w = d["w0"].clone().requires_grad_(True)
    kw = _loss_kwargs(method, d)
    if method in ("dr_cpo", "oo_rlhf"):
        kw["dm_policy_logp"] = _seq_logp(w, d["emb"], d["tok_dm"])
    if method == "oo_rlhf":
        out = dr_cpo_loss(None, None, None, weighting=weighting, **kw)
    else:
        out = dr_cpo_loss(_seq_logp(w, d["emb"], d["tok"]), d["ref"], d["y"], weighting=weighting,
                          **kw)
    out.loss.backward()
    return w.grad


def _two_pass_grad(method: str, weighting: str, d: dict, rows: torch.Tensor,
                   dm_rows: torch.Tensor, sizes: list[int], dm_sizes: list[int],
                   objective: Objective | None = None) -> torch.Tensor:
    """This process's rows (split into micro-batches): pass 1 no-grad, coefficients, pass 2."""
    w = d["w0"].clone().requires_grad_(True)
    use_main, use_dm = method != "oo_rlhf", method in ("dr_cpo", "oo_rlhf")
    with torch.no_grad():  # pass 1
        s = _seq_logp(w, d["emb"], d["tok"][rows]) if use_main else None
        s_dm = _seq_logp(w, d["emb"], d["tok_dm"][dm_rows]) if use_dm else None
    kw = _loss_kwargs(method, d, rows, dm_rows)
    if use_dm:
        kw["dm_policy_logp"] = s_dm
    rc = row_coefficients({"policy_logp": s, "ref_logp": d["ref"][rows] if use_main else None,
                           "outcome": d["y"][rows] if use_main else None, **kw},
                          objective or Objective(method, weighting=weighting), current_world())
    coefs = split_rows(rc.policy, sizes if use_main else [0] * len(sizes))
    dm_coefs = split_rows(rc.dm, dm_sizes if use_dm else [0] * len(dm_sizes))
    r_parts, dm_parts = torch.split(rows, sizes), torch.split(dm_rows, dm_sizes)
    for c, c_dm, r, r_dm in zip(coefs, dm_coefs, r_parts, dm_parts, strict=True):  # pass 2, accumulating
        s_mb = _seq_logp(w, d["emb"], d["tok"][r]) if use_main else None
        s_dm_mb = _seq_logp(w, d["emb"], d["tok_dm"][r_dm]) if use_dm else None
        surrogate(c, s_mb, c_dm, s_dm_mb).backward()
    return w.grad


CASES = [(m, w) for m in ("cpo", "dr_cpo", "oo_rlhf")
         for w in ("raw", "self_normalized", "clipped", "truncated")]


@pytest.mark.parametrize("method,weighting", CASES)
def test_accumulation_equals_full_batch(method, weighting):
    """One process, micro-batches of 3, 2 and 3 rows (DM: 4, 4, 2): exact full-batch gradient."""
    d = _data(1)
    if weighting == "clipped":  # put some rows outside the trust region
        d["ref"][:3] -= 0.6
    full = _full_grad(method, weighting, d)
    acc = _two_pass_grad(method, weighting, d, torch.arange(N_ROWS), torch.arange(N_DM),
                         [3, 2, 3], [4, 4, 2])
    torch.testing.assert_close(acc, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["cpo", "dr_cpo", "oo_rlhf"])
def test_tempered_accumulation_equals_full_batch(method):
    """ESS-targeted tempering: tau is the effective batch's (one per weighted set), so the
    micro-batches' gradient is the full batch's, and tempering did act (tau < 1)."""
    d = _data(4)
    d["w0"] *= 4  # spread the log weights so that the target bites
    obj = Objective(method, ess_target=0.8)
    w = d["w0"].clone().requires_grad_(True)
    rows = {"dm_policy_logp": _seq_logp(w, d["emb"], d["tok_dm"]), "dm_ref_logp": d["ref_dm"],
            "dm_outcome_pred": d["ghat_dm"]} if method != "cpo" else {}
    if method != "oo_rlhf":
        rows.update(policy_logp=_seq_logp(w, d["emb"], d["tok"]), ref_logp=d["ref"],
                    outcome=d["y"], outcome_pred=d["ghat"] if method == "dr_cpo" else None)
    out = obj.rows_loss(rows)
    out.loss.backward()
    taus = [t for t in (out.ess_tau, out.dm_ess_tau) if t is not None]
    assert taus and all(t < 1.0 for t in taus)
    acc = _two_pass_grad(method, "self_normalized", d, torch.arange(N_ROWS), torch.arange(N_DM),
                         [3, 2, 3], [4, 4, 2], objective=obj)
    torch.testing.assert_close(acc, w.grad, rtol=1e-10, atol=1e-12)


def test_naive_micro_batch_normalization_differs():
    """The guard against a test that cannot fail: per-micro-batch self-normalization
    (what a plain accumulation loop does) gives another gradient."""
    d = _data(2)
    full = _full_grad("cpo", "self_normalized", d)
    w = d["w0"].clone().requires_grad_(True)
    for r in torch.split(torch.arange(N_ROWS), [3, 2, 3]):
        out = dr_cpo_loss(_seq_logp(w, d["emb"], d["tok"][r]), d["ref"][r], d["y"][r])
        (out.loss / 3).backward()
    assert (w.grad - full).abs().max() > 1e-3


def test_diagnostics_are_those_of_the_effective_batch():
    d = _data(3)
    s = _seq_logp(d["w0"], d["emb"], d["tok"])
    rc = row_coefficients({"policy_logp": s, "ref_logp": d["ref"], "outcome": d["y"]},
                          Objective("cpo"))
    ref = dr_cpo_loss(s, d["ref"], d["y"])
    torch.testing.assert_close(rc.output.ess, ref.ess)
    torch.testing.assert_close(rc.output.loss, ref.loss.detach())
    # closed form for self-normalization: c_i = -W_i (a_i - abar_W) / n
    W = ref.weights
    torch.testing.assert_close(rc.policy, -W * (d["y"] - (W * d["y"]).mean()) / N_ROWS)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="unknown loss setting.*distributed"):
        Objective.from_kwargs("cpo", distributed=True)  # the effective batch gathers itself
    with pytest.raises(ValueError, match="policy_logp"):
        surrogate(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="do not add up"):
        split_rows(torch.zeros(4), [1, 2])


def _rank_worker(rank: int, world: int, port: int, cases, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = _data(4)
        d["ref"][:2] -= 0.6
        # rank 0: rows 0-4 as micro-batches (3, 2); rank 1: rows 5-7 as (2, 1). DM 6 / 4 rows.
        rows = torch.arange(0, 5) if rank == 0 else torch.arange(5, 8)
        sizes = [3, 2] if rank == 0 else [2, 1]
        dm_rows = torch.arange(0, 6) if rank == 0 else torch.arange(6, 10)
        dm_sizes = [3, 3] if rank == 0 else [2, 2]
        res = {}
        for method, weighting in cases:
            g = _two_pass_grad(method, weighting, d, rows, dm_rows, sizes, dm_sizes)
            dist.all_reduce(g)
            res[(method, weighting)] = (g / world).tolist()  # DDP's average
        q.put((rank, res))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_accumulation_equal_one_process():
    """2 gloo ranks x uneven micro-batches == one process with the whole batch (fp64)."""
    cases = [(m, w) for m in ("cpo", "dr_cpo") for w in ("self_normalized", "clipped")]
    results = spawn_ranks(_rank_worker, 2, cases, timeout=180)
    d = _data(4)
    d["ref"][:2] -= 0.6
    for case in cases:
        full = _full_grad(*case, d)
        for rank in (0, 1):
            got = torch.tensor(results[rank][case], **f64)
            torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12, msg=str(case))
