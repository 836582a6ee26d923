"""Triton fused-linear path against the float64 reference: values and gradients.

Runs natively on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported). Tiles are forced to 16 so every loop (d chunks, vocabulary
tiles, forward splits, backward vocabulary chunks) runs several trips on small shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpo_fast._backend import triton_interpreting

if not torch.cuda.is_available() and not triton_interpreting():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before importing triton)",
                allow_module_level=True)
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cpo_fast  # noqa: E402
from cpo_fast import reference  # noqa: E402
from cpo_fast.kernels import linear_token_logprobs as K  # noqa: E402

INTERPRET = triton_interpreting()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# bf16 tl.dot is wrong in the interpreter; the kernel upcasts there, which would test
# fp32 dots, not bf16 ones: bf16 runs natively only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Max error relative to the largest reference magnitude. Forward values are exact
# products accumulated in fp32; gradients pass through dz and outputs in the operand dtype.
VAL_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TINY = dict(block_n=16, block_v=16, block_d=16, num_warps=4, num_stages=1)


def _rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-6) -> float:
    scale = max(want.abs().max().item(), floor) if want.numel() else 1.0
    return (got.double() - want).abs().max().item() / scale if want.numel() else 0.0


def _make(N, V, D, dtype, *, seed, bias, scale=1.0, n_neg_inf=0, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g) * scale / max(D, 1) ** 0.25
    w = torch.randn(V, D, generator=g) / max(D, 1) ** 0.25
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if b is not None and n_neg_inf and V > n_neg_inf:
        banned = torch.randperm(V, generator=g)[:n_neg_inf]
        b[banned] = float("-inf")
        ok = torch.tensor([v for v in range(V) if v not in set(banned.tolist())])
        labels = ok[torch.randint(0, len(ok), (N,), generator=g)]
    if ignore == "all":
        labels[:] = -100
    elif ignore == "some":
        labels[torch.rand(N, generator=g) < 0.3] = -100
    G = torch.randn(N, generator=g)
    E = torch.randn(N, generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)
    return cast(h), cast(w), cast(b), labels.to(DEVICE), G.to(DEVICE), E.to(DEVICE)


def _reference(h, w, b, labels, G, E, with_entropy, frozen):
    """float64 values and autograd gradients on the same (rounded) inputs."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(not frozen)
    b64 = None if b is None else b.detach().double().requires_grad_()
    out = reference.linear_token_logprobs(h64, w64, labels, bias=b64, with_entropy=with_entropy)
    lp, H = out if with_entropy else (out, None)
    loss = (lp * G.double()).sum() + (0 if H is None else (H * E.double()).sum())
    loss.backward()
    return lp.detach(), H, h64.grad, w64.grad, None if b is None else b64.grad


def _triton(h, w, b, labels, G, E, with_entropy, frozen, threshold=0.0):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(not frozen)
    b = None if b is None else b.detach().clone().requires_grad_()
    out = cpo_fast.linear_token_logprobs(h, w, labels, bias=b, with_entropy=with_entropy,
                                         backend="triton", grad_skip_threshold=threshold)
    lp, H = out if with_entropy else (out, None)
    loss = (lp * G).sum() + (0 if H is None else (H * E).sum())
    loss.backward()
    return lp.detach(), None if H is None else H.detach(), h.grad, w.grad, \
        None if b is None else b.grad


def _check(dtype, got, want, frozen):
    lp, H, gh, gw, gb = got
    rlp, rH, rgh, rgw, rgb = want
    assert lp.dtype == torch.float32
    assert _rel_err(lp, rlp) <= VAL_TOL[dtype] * 10, "logp"
    if rH is not None:
        # Entropy errors are absolute (fp32 rounding of logit-sized terms): measure them
        # against at least 1 nat, else a near-zero entropy (one dominant token) fails on noise.
        assert _rel_err(H, rH.detach(), floor=1.0) <= VAL_TOL[dtype] * 10, "entropy"
    assert gh.dtype == dtype and _rel_err(gh, rgh) <= GRAD_TOL[dtype], "grad_hidden"
    if frozen:
        assert gw is None
    else:
        assert gw.dtype == dtype and _rel_err(gw, rgw) <= GRAD_TOL[dtype], "grad_weight"
    if rgb is not None:
        assert gb.dtype == dtype and _rel_err(gb, rgb) <= GRAD_TOL[dtype], "grad_bias"


@st.composite
def cases(draw):
    N = draw(st.sampled_from([1, 2, 15, 17, 40]))
    V = draw(st.sampled_from([1, 7, 17, 33, 51, 97]))
    D = draw(st.sampled_from([1, 5, 16, 23, 48, 70]))
    dtype = draw(st.sampled_from(DTYPES))
    bias = draw(st.booleans())
    n_neg_inf = draw(st.sampled_from([0, 0, 2])) if bias else 0
    return dict(
        N=N, V=V, D=D, dtype=dtype, bias=bias, n_neg_inf=n_neg_inf,
        scale=draw(st.sampled_from([1.0, 8.0])),
        ignore=draw(st.sampled_from(["none", "some", "all"])),
        with_entropy=draw(st.booleans()), frozen=draw(st.booleans()),
        splits=draw(st.sampled_from([None, 1, 3])), chunk=draw(st.sampled_from([16, 32, 48])),
        row_group=draw(st.sampled_from([None, None, 16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(c=cases())
def test_matches_reference(c):
    h, w, b, labels, G, E = _make(c["N"], c["V"], c["D"], c["dtype"], seed=c["seed"],
                                  bias=c["bias"], scale=c["scale"], n_neg_inf=c["n_neg_inf"],
                                  ignore=c["ignore"])
    want = _reference(h, w, b, labels, G, E, c["with_entropy"], c["frozen"])
    with K.override_config(**TINY, splits=c["splits"], vocab_chunk=c["chunk"],
                           row_group=c["row_group"]):
        got = _triton(h, w, b, labels, G, E, c["with_entropy"], c["frozen"])
    _check(c["dtype"], got, want, c["frozen"])
    ignored = labels == -100
    assert (got[0][ignored] == 0).all()
    if c["with_entropy"]:
        assert (got[1][ignored] == 0).all()
        assert (got[1][~ignored] >= -1e-4).all()
    if ignored.all():
        assert (got[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_config(dtype):
    """The default (un-overridden) tiles on a shape that is no multiple of them."""
    h, w, b, labels, G, E = _make(70, 301, 130, dtype, seed=1, bias=True)
    want = _reference(h, w, b, labels, G, E, True, False)
    _check(dtype, _triton(h, w, b, labels, G, E, True, False), want, False)


def test_tied_embeddings():
    """The output weight is also the input embedding: both gradient paths add up."""
    torch.manual_seed(0)
    V, D, N = 45, 24, 19
    dtype = torch.float32
    emb_w = (torch.randn(V, D) * 0.5).to(DEVICE)
    ids = torch.randint(0, V, (N,), device=DEVICE)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[2] = -100
    mix = torch.randn(D, D, device=DEVICE) / D**0.5
    G = torch.randn(N, device=DEVICE)

    def run(weight: torch.Tensor, backend: str) -> torch.Tensor:
        emb = torch.nn.Embedding(V, D, _weight=weight.clone()).to(DEVICE)
        hidden = torch.tanh(emb(ids).to(weight.dtype) @ mix.to(weight.dtype))
        lp = cpo_fast.linear_token_logprobs(hidden, emb.weight, labels, backend=backend)
        (lp * G.to(lp.dtype)).sum().backward()
        return emb.weight.grad

    with K.override_config(**TINY, vocab_chunk=16):
        got = run(emb_w.to(dtype), "triton")
    want = run(emb_w.double(), "reference")
    assert _rel_err(got, want) <= GRAD_TOL[dtype]
    # The embedding rows of ids got both contributions.
    assert got[ids].abs().sum() > 0


def test_backend_flags_and_frozen_weight():
    """Gradients not asked for are not computed (None), and the rest are unchanged."""
    h, w, b, labels, G, E = _make(20, 37, 21, torch.float32, seed=3, bias=True)
    cfg = K.Config(**TINY, vocab_chunk=16)
    lp, ent, lse = K.linear_token_logprobs_forward(h, w, b, labels, -100, True, config=cfg)
    args = (h, w, b, labels, lse, ent, G, E, -100)
    full = K.linear_token_logprobs_backward(*args, True, True, True, 0.0, config=cfg)
    assert K.linear_token_logprobs_backward(*args, False, False, False, 0.0, config=cfg) == \
        (None, None, None)
    gh, gw, gb = K.linear_token_logprobs_backward(*args, True, False, False, 0.0, config=cfg)
    assert gw is None and gb is None and torch.equal(gh, full[0])
    gh, gw, gb = K.linear_token_logprobs_backward(*args, False, True, True, 0.0, config=cfg)
    assert gh is None and torch.equal(gw, full[1]) and torch.equal(gb, full[2])
    lp2, ent2, _ = K.linear_token_logprobs_forward(h, w, b, labels, -100, False, config=cfg)
    assert ent2 is None and torch.equal(lp2, lp)


def test_ignore_index_inside_vocabulary():
    """ignore_index may be a real token id (e.g. pad = 0): those rows still give nothing."""
    h, w, b, labels, G, E = _make(18, 29, 17, torch.float32, seed=5, bias=False, ignore="none")
    labels[::3] = 0
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    lp_ref = reference.linear_token_logprobs(h64, w64, labels, ignore_index=0)
    (lp_ref * G.double()).sum().backward()
    h1 = h.clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    with K.override_config(**TINY, vocab_chunk=16):
        lp = cpo_fast.linear_token_logprobs(h1, w1, labels, ignore_index=0, backend="triton")
        (lp * G).sum().backward()
    assert _rel_err(lp, lp_ref.detach()) < 1e-5
    assert _rel_err(h1.grad, h64.grad) < GRAD_TOL[torch.float32]
    assert _rel_err(w1.grad, w64.grad) < GRAD_TOL[torch.float32]


@settings(max_examples=8, deadline=None)
@given(
    threshold=st.sampled_from([1e-3, 1e-2, 0.1, 0.5]),
    with_entropy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_grad_skip_threshold_error_bound(threshold, with_entropy, seed):
    """Skipping tiles with max p < tau changes each gradient by at most the stated bound.

    Each dropped dz_tv satisfies |dz_tv| <= b_t (K.skip_error_bound), hence
    |d grad_h[t, k]| <= b_t sum_v |W[v, k]|, |d grad_W[v, k]| <= sum_t b_t |h[t, k]|,
    |d grad_b[v]| <= sum_t b_t (plus the fp32 rounding of the exact path).
    """
    N, V, D = 33, 97, 24
    h, w, b, labels, G, E = _make(N, V, D, torch.float32, seed=seed, bias=True, scale=12.0)
    # Peaked distributions: a few hot tokens per row so most tiles carry little mass.
    w[:5] *= 4.0
    want = _reference(h, w, b, labels, G, E, with_entropy, False)
    with K.override_config(**TINY, vocab_chunk=32):
        exact = _triton(h, w, b, labels, G, E, with_entropy, False)
        got = _triton(h, w, b, labels, G, E, with_entropy, False, threshold=threshold)
    # Forward is untouched by the option.
    assert torch.equal(got[0], exact[0])
    H = want[1].detach() if with_entropy else None
    bt = K.skip_error_bound(G, E if with_entropy else None, H, threshold)
    bt = torch.where(labels == -100, 0.0, bt.double())
    slack = 1e-5
    bound_h = bt[:, None] * w.double().abs().sum(0)[None, :]
    bound_w = (bt[:, None] * h.double().abs()).sum(0)[None, :].expand(V, D)
    bound_b = bt.sum().expand(V)
    for got_g, want_g, bound in ((got[2], want[2], bound_h), (got[3], want[3], bound_w),
                                 (got[4], want[4], bound_b)):
        err = (got_g.double() - want_g).abs()
        assert (err <= bound + slack * max(want_g.abs().max().item(), 1.0)).all()


def test_grad_skip_threshold_skips_something():
    """The bound test above is vacuous unless tiles really are skipped: on peaked rows at
    tau = 0.1 the skipped path must differ from the exact one."""
    N, V, D = 33, 97, 24
    h, w, b, labels, G, E = _make(N, V, D, torch.float32, seed=7, bias=True, scale=12.0)
    w[:5] *= 4.0
    with K.override_config(**TINY, vocab_chunk=32):
        exact = _triton(h, w, b, labels, G, E, False, False)
        got = _triton(h, w, b, labels, G, E, False, False, threshold=0.1)
    assert not torch.equal(got[3], exact[3])


def test_grad_skip_threshold_bound_tight_cases():
    """The bound formula itself: p log(1/p) <= tau max(log(1/tau), 1) for p < tau."""
    for tau in (1e-6, 1e-3, 0.2, 1 / math.e, 0.5, 0.9):
        p = torch.linspace(1e-12, tau, 10_000, dtype=torch.float64)[:-1]
        lhs = (p * -torch.log(p)).max().item()
        assert lhs <= tau * max(-math.log(tau), 1.0) + 1e-15


def test_row_group_env(monkeypatch):
    """CPO_FAST_LINEAR_ROW_GROUP selects the memory-lean backward without code changes."""
    monkeypatch.setenv("CPO_FAST_LINEAR_ROW_GROUP", "16")
    assert K.default_config(64, torch.float16).row_group == 16
    h, w, b, labels, G, E = _make(40, 33, 20, torch.float16, seed=7, bias=True)
    want = _reference(h, w, b, labels, G, E, False, False)
    _check(torch.float16, _triton(h, w, b, labels, G, E, False, False), want, False)
