"""Head transforms (temperature, softcap, logit_scale) in both fused ops, every backend,
against the float64 reference: values and gradients, -inf logits, ignored rows, the
frozen-weight path, validation, torch.compile and opcheck.

    u = logit_scale z,   z' = (softcap tanh(u / softcap) if softcap else u) / temperature

(Hugging Face / TRL order). Triton runs under the interpreter on small shapes (small tiles
forced), the C++ backend with small blocks / row chunks, the reference backend in the
input dtype (float32 for half inputs); the ground truth is the reference in float64.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import device, kernel_backends
from hypothesis import given, settings
from hypothesis import strategies as st

import cpo_fast
from cpo_fast import reference
from cpo_fast._transform import HeadTransform

FUSED = kernel_backends()
BACKENDS = [*FUSED, "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error of a stored gradient (written in the input's dtype).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LINEAR_GRAD_TOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TINY = dict(block_n=16, block_v=16, block_d=16, num_warps=4, num_stages=1)


def dev(backend: str) -> str:
    return "cpu" if backend == "cpu" else device()


def head(temperature, softcap, logit_scale) -> dict:
    return dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)


def transformed(z64: torch.Tensor, kw: dict) -> torch.Tensor:
    return reference.apply_head_transform(z64, HeadTransform(**kw))


@contextlib.contextmanager
def small_blocks(backend: str, block: int | None):
    """Many chunks: Triton vocabulary chunks of ``block`` (the CPU kernels have no chunk knob)."""
    with contextlib.ExitStack() as stack:
        if block is not None and backend == "triton":
            from cpo_fast.kernels import token_logprobs as tk

            stack.enter_context(tk.override_config(block_v=block))
        yield


@st.composite
def transforms(draw):
    temperature = draw(st.floats(0.3, 3.0))
    softcap = draw(st.sampled_from([None, 5.0, 30.0]))
    sign = draw(st.sampled_from([1.0, 1.0, -1.0]))
    logit_scale = sign * draw(st.floats(0.1, 4.0))
    return head(temperature, softcap, logit_scale)


# ----------------------------------------------------------------------------- logits path
@st.composite
def logits_cases(draw):
    return dict(
        B=draw(st.integers(1, 3)), T=draw(st.integers(1, 4)),
        V=draw(st.sampled_from([1, 2, 7, 33, 97, 129])),
        dtype=draw(st.sampled_from(DTYPES)), mag=draw(st.sampled_from([1.0, 10.0, 100.0])),
        ignore=draw(st.sampled_from(["none", "some", "all"])), n_neg_inf=draw(st.integers(0, 3)),
        shifted=draw(st.booleans()), with_entropy=draw(st.booleans()), tf=draw(transforms()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_logits(c: dict, dev: str):
    g = torch.Generator().manual_seed(c["seed"])
    B, T, V = c["B"], c["T"], c["V"]
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * c["mag"]
    labels = torch.randint(0, V, (B, T), generator=g)
    # -inf logits (away from the label) need a softcap: a negative scale without one makes
    # them +inf, which has no softmax (the reference gives NaN as well).
    if V > 1 and (c["tf"]["softcap"] is not None or c["tf"]["logit_scale"] > 0):
        for _ in range(c["n_neg_inf"]):
            b = int(torch.randint(0, B, (1,), generator=g))
            t = int(torch.randint(0, T, (1,), generator=g))
            v = (int(labels[b, t]) + 1 + int(torch.randint(0, V - 1, (1,), generator=g))) % V
            full[b, t, v] = -math.inf
    if c["ignore"] == "some":
        labels[torch.rand(B, T, generator=g) < 0.4] = -100
    elif c["ignore"] == "all":
        labels[:] = -100
    full = full.to(c["dtype"]).to(dev)
    logits = full[:, :-1, :] if c["shifted"] else full[:, :-1, :].contiguous()
    return logits, labels.to(dev)


def check_token_logprobs(backend: str, c: dict) -> None:
    kw, dtype, with_entropy = c["tf"], c["dtype"], c["with_entropy"]
    logits, labels = make_logits(c, dev(backend))
    B, T, V = logits.shape
    x = logits.detach().requires_grad_(True)
    out = cpo_fast.token_logprobs(x, labels, with_entropy=with_entropy, backend=backend, **kw)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference.token_logprobs(ref_in, labels, with_entropy=with_entropy, **kw)
    lp, rlp = (out[0], ref[0]) if with_entropy else (out, ref)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape

    zt = transformed(ref_in.detach(), kw)
    zmax = zt[torch.isfinite(zt)].abs().max().item() if torch.isfinite(zt).any() else 1.0
    atol = 4e-6 * (1.0 + zmax)
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=atol, rtol=1e-6)
    if with_entropy:
        torch.testing.assert_close(out[1].double(), ref[1].detach(), atol=atol + 1e-5, rtol=1e-5)
    ignored = labels == -100
    assert (lp[ignored] == 0).all()

    g = torch.Generator().manual_seed(c["seed"] + 1)
    G = torch.randn(B, T, generator=g, dtype=torch.float64).to(logits.device)
    E = torch.randn(B, T, generator=g, dtype=torch.float64).to(logits.device)
    loss = (lp * G.float()).sum() + ((out[1] * E.float()).sum() if with_entropy else 0)
    rloss = (rlp * G).sum() + ((ref[1] * E).sum() if with_entropy else 0)
    loss.backward()
    rloss.backward()
    # |dL/dz| <= |dL/dz'| |logit_scale| / temperature, |dL/dz'| <= |G| + |E| (2 + log V)
    factor = abs(kw["logit_scale"]) / kw["temperature"]
    scale_g = (G.abs().max() + (E.abs().max() * (2 + math.log(V)) if with_entropy else 0)).item()
    # float32 rounding of z' (relative 2^-24 per op) moves p by that much relative
    tol = GRAD_TOL[dtype] + 2e-7 * zmax  # the reference backend also returns the dtype
    err = (x.grad.double() - ref_in.grad).abs().max().item()
    assert err <= tol * scale_g * factor + 1e-12, err
    assert (x.grad[ignored] == 0).all()
    assert torch.isfinite(x.grad).all()
    neg_inf = torch.isneginf(ref_in.detach())
    if kw["softcap"] is not None:  # capped to -softcap / T, zero gradient
        assert (x.grad[neg_inf] == 0).all()
    # The closed form (docs/math.md), chain-rule factor included, is autograd's gradient.
    closed = reference.token_logprobs_grad(ref_in.detach(), labels, G, E if with_entropy else None,
                                           **kw)
    torch.testing.assert_close(closed, ref_in.grad, atol=1e-9 * (1 + scale_g * factor), rtol=1e-9)


@pytest.mark.parametrize("block", [16, None], ids=["small-chunks", "default-chunks"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(c=logits_cases())
def test_token_logprobs_transform_matches_float64(backend, block, c):
    with small_blocks(backend, block):
        check_token_logprobs(backend, c)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kw", [head(0.5, 5.0, 1.0), head(2.0, None, -1.5)], ids=["cap", "scale"])
def test_inplace_backward_with_transform(backend, kw):
    torch.manual_seed(0)
    base = (torch.randn(2, 5, 45) * 20).to(dev(backend))
    labels = torch.randint(0, 45, (2, 4), device=base.device)
    labels[0, 1] = -100

    def run(inplace: bool):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0
        lp, ent = cpo_fast.token_logprobs(logits[:, :-1], labels, with_entropy=True,
                                          backend=backend, inplace_backward=inplace, **kw)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return leaf.grad

    torch.testing.assert_close(run(True), run(False), atol=0, rtol=0)


# ----------------------------------------------------------------------------- linear path
@st.composite
def linear_cases(draw):
    bias = draw(st.booleans())
    tf = draw(transforms())
    return dict(
        N=draw(st.sampled_from([1, 2, 17, 40])), V=draw(st.sampled_from([1, 7, 33, 51])),
        D=draw(st.sampled_from([1, 5, 16, 23])), dtype=draw(st.sampled_from(DTYPES)),
        bias=bias, n_neg_inf=draw(st.sampled_from([0, 2])) if bias and tf["softcap"] else 0,
        mag=draw(st.sampled_from([1.0, 8.0])), ignore=draw(st.sampled_from(["none", "some", "all"])),
        with_entropy=draw(st.booleans()), frozen=draw(st.booleans()), tf=tf,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_linear(c: dict, dev: str):
    g = torch.Generator().manual_seed(c["seed"])
    N, V, D = c["N"], c["V"], c["D"]
    h = torch.randn(N, D, generator=g) * c["mag"] / D**0.25
    w = torch.randn(V, D, generator=g) / D**0.25
    b = torch.randn(V, generator=g) if c["bias"] else None
    labels = torch.randint(0, V, (N,), generator=g)
    if b is not None and c["n_neg_inf"] and V > c["n_neg_inf"]:
        banned = torch.randperm(V, generator=g)[: c["n_neg_inf"]]
        b[banned] = -math.inf  # masked tokens: -softcap / T under the cap
        ok = torch.tensor([v for v in range(V) if v not in set(banned.tolist())])
        labels = ok[torch.randint(0, len(ok), (N,), generator=g)]
    if c["ignore"] == "all":
        labels[:] = -100
    elif c["ignore"] == "some":
        labels[torch.rand(N, generator=g) < 0.3] = -100
    G, E = torch.randn(N, generator=g), torch.randn(N, generator=g)
    cast = lambda t: None if t is None else t.to(c["dtype"]).to(dev)
    return cast(h), cast(w), cast(b), labels.to(dev), G.to(dev), E.to(dev)


def run_linear(h, w, b, labels, G, E, c, backend):
    """(logp, entropy, grad_h, grad_w, grad_b); float64 autograd for backend=None."""
    ref = backend is None
    cast = (lambda t: t.detach().double()) if ref else (lambda t: t.detach().clone())
    hh = cast(h).requires_grad_()
    ww = cast(w).requires_grad_(not c["frozen"])
    bb = None if b is None else cast(b).requires_grad_(not c["frozen"])
    kw = dict(bias=bb, with_entropy=c["with_entropy"], **c["tf"])
    if ref:
        out = reference.linear_token_logprobs(hh, ww, labels, **kw)
    else:
        out = cpo_fast.linear_token_logprobs(hh, ww, labels, backend=backend, **kw)
    lp, H = out if c["with_entropy"] else (out, None)
    GG, EE = (G.double(), E.double()) if ref else (G, E)
    ((lp * GG).sum() + (0 if H is None else (H * EE).sum())).backward()
    return (lp.detach(), None if H is None else H.detach(), hh.grad, ww.grad,
            None if bb is None else bb.grad)


def rel_err(got, want, floor=1e-6) -> float:
    """max |got - want| over max(max |want|, floor): floor is the error scale when the
    result itself cancels to ~0 (see error_scales)."""
    if want.numel() == 0:
        return 0.0
    return (got.double().cpu() - want.cpu()).abs().max().item() / max(
        want.abs().max().item(), floor, 1e-12)


@contextlib.contextmanager
def linear_blocks(backend: str):
    with contextlib.ExitStack() as stack:
        if backend == "triton":
            from cpo_fast.kernels import linear_token_logprobs as lk

            stack.enter_context(lk.override_config(**TINY, vocab_chunk=16))
        if backend == "cpu":
            from cpo_fast.cpu import linear_token_logprobs as cl

            stack.enter_context(cl.override_config(block_rows=7, block_cols=5))
        yield


def error_scales(h, w, b, labels, G, E, c) -> dict[str, float]:
    """The magnitudes rounding errors scale with, in float64, before any cancellation:
    max |z'| for logp and entropy (both are differences of O(|z'|) terms), and for the
    gradients the matmul bound |dz| |w|, |dz|^T |h|, sum |dz|, where |dz| adds the closed
    form's terms' magnitudes, |G| ([v==y] + p) + |E| (|p log p| + p H), times |dz'/dz|.
    Relative to these, an exact-in-float64 kernel is off by a few ulps of its dtype; a wrong
    term or sign is off by O(1). Without them, a gradient that cancels to ~0 (N = D = 1,
    p_y ~ 1) fails on rounding alone."""
    valid = (labels != -100).cpu()
    h64, w64 = h.double().cpu(), w.double().cpu()
    z = torch.where(valid[:, None], h64, 0.0) @ w64.T
    if b is not None:
        z = z + b.double().cpu()
    z = z.requires_grad_()
    zt = reference.apply_head_transform(z, HeadTransform(**c["tf"]))
    (chain,) = torch.autograd.grad(zt.sum(), z)  # the transform is elementwise
    zt, chain = zt.detach(), chain.abs()
    p = torch.softmax(zt, -1)
    plogp = torch.xlogy(p, p)
    ent = -plogp.sum(-1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[valid] = onehot[valid].scatter(-1, labels.cpu()[valid][:, None], 1.0)
    G64, E64 = G.double().cpu().abs()[:, None], E.double().cpu().abs()[:, None]
    dz = (G64 * (onehot + p) + E64 * (plogp.abs() + p * ent)) * chain
    dz = torch.where(valid[:, None], dz.nan_to_num(0.0), 0.0)
    finite = zt[valid].masked_fill(~torch.isfinite(zt[valid]), 0.0)
    return dict(logp=max(finite.abs().max().item() if finite.numel() else 0.0, 1.0),
                grad_hidden=(dz @ w64.abs()).max().item() if dz.numel() else 0.0,
                grad_weight=(dz.T @ h64.abs()).max().item() if dz.numel() else 0.0,
                grad_bias=dz.sum(0).max().item() if dz.numel() else 0.0)


def check_linear(backend: str, c: dict) -> None:
    h, w, b, labels, G, E = make_linear(c, dev(backend))
    want = run_linear(h, w, b, labels, G, E, c, None)
    with linear_blocks(backend):
        got = run_linear(h, w, b, labels, G, E, c, backend)
    dtype = c["dtype"]
    lp, H, gh, gw, gb = got
    rlp, rH, rgh, rgw, rgb = want
    scale = error_scales(h, w, b, labels, G, E, c)
    assert rel_err(lp, rlp, floor=scale["logp"]) <= 2e-4, "logp"
    if rH is not None:
        assert rel_err(H, rH, floor=scale["logp"]) <= 2e-4, "entropy"
    tol = LINEAR_GRAD_TOL[dtype]
    assert gh.dtype == dtype and rel_err(gh, rgh, scale["grad_hidden"]) <= tol, "grad_hidden"
    if c["frozen"]:
        assert gw is None
    else:
        assert rel_err(gw, rgw, scale["grad_weight"]) <= tol, "grad_weight"
        if rgb is not None:
            assert rel_err(gb, rgb, scale["grad_bias"]) <= tol, "grad_bias"
            if c["n_neg_inf"]:  # masked tokens: zero gradient under the cap
                assert (gb[torch.isneginf(b)] == 0).all()
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (gh[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(c=linear_cases())
def test_linear_transform_matches_float64(backend, c):
    check_linear(backend, c)


# ----------------------------------------------------------------------------- specific cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_softcap_on_large_logits(backend):
    """softcap = 30 on logits of magnitude ~100 (Gemma-2's final_logit_softcapping): the
    reference-exact result, and not the uncapped one (the cap really acts)."""
    torch.manual_seed(3)
    d = dev(backend)
    z = (torch.randn(3, 6, 50, dtype=torch.float64) * 100).to(d)
    labels = torch.randint(0, 50, (3, 6), device=d)
    x = z.float().requires_grad_(True)
    lp, ent = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend=backend, softcap=30.0)
    z64 = z.float().double().requires_grad_(True)
    rlp, rent = reference.token_logprobs(z64, labels, with_entropy=True, softcap=30.0)
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=5e-5, rtol=1e-6)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=5e-5, rtol=1e-5)
    uncapped = cpo_fast.token_logprobs(z.float(), labels, backend=backend)
    assert (lp.detach() - uncapped).abs().max() > 1.0  # a test that could fail
    # capped logits lie in (-30, 30): every row has spread < 60, so logp > -60 - log V
    assert (lp > -60 - math.log(50)).all() and (uncapped < -100).any()
    (lp.sum() + ent.sum()).backward()
    (rlp.sum() + rent.sum()).backward()
    torch.testing.assert_close(x.grad.double(), z64.grad, atol=2e-5, rtol=1e-4)
    # the linear op on the same logits (hidden = identity rows, weight = the logits^T)
    hid = torch.eye(18, device=d)
    lin_lp = cpo_fast.linear_token_logprobs(hid, z.float().reshape(18, 50).T.contiguous(),
                                            labels.reshape(18), backend=backend, softcap=30.0)
    torch.testing.assert_close(lin_lp.double(), rlp.detach().reshape(18), atol=5e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_logits_under_softcap(backend, dtype):
    """-inf becomes -softcap / T (finite, as torch.tanh(-inf) = -1 in HF models), and its
    gradient factor is 0; ignored rows stay 0."""
    d = dev(backend)
    z = torch.tensor([[1.0, -math.inf, 3.0, -math.inf, 0.5],
                      [-math.inf, -math.inf, 2.0, 0.0, 1.0],
                      [math.nan, 1.0, 2.0, 3.0, 4.0]], dtype=dtype, device=d)
    labels = torch.tensor([2, 1, -100], device=d)  # row 1's label logit is -inf itself
    kw = head(0.5, 5.0, 2.0)
    x = z.clone().requires_grad_(True)
    lp, ent = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend=backend, **kw)
    z64 = z.double().requires_grad_(True)
    rlp, rent = reference.token_logprobs(z64, labels, with_entropy=True, **kw)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=1e-5, rtol=1e-5)
    # the capped -inf is -softcap / T = -10: row 1's label has logit -10
    zt = reference.apply_head_transform(z64.detach(), HeadTransform(**kw))
    assert zt[1, 1].item() == -10.0
    (lp.sum() + ent.sum()).backward()
    (rlp.sum() + rent.sum()).backward()
    assert (x.grad[torch.isneginf(z)] == 0).all()
    assert (x.grad[2] == 0).all()  # ignored, NaN logits: still zero
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(x.grad.double()[:2], z64.grad[:2], atol=tol * 10, rtol=tol)


def test_defaults_reach_backends_as_no_transform(monkeypatch):
    """The identity takes today's path: backends receive transform=None (the kernels'
    HAS_TRANSFORM flag off, the C++ kernels on the logits directly), bitwise the same."""
    if not FUSED:
        pytest.skip("no fused backend")
    from cpo_fast._backend import backend_module

    backend = FUSED[-1]
    seen = []
    for op, fn in (("token_logprobs", "token_logprobs_forward"),
                   ("linear_token_logprobs", "linear_token_logprobs_forward")):
        mod = backend_module(backend, op)
        real = getattr(mod, fn)

        def spy(*a, real=real, **k):
            seen.append(k.get("transform"))
            return real(*a, **k)

        monkeypatch.setattr(mod, fn, spy)
    z = torch.randn(4, 9, device=dev(backend))
    lab = torch.tensor([0, 3, 8, -100], device=z.device)
    a = cpo_fast.token_logprobs(z, lab, backend=backend)
    b = cpo_fast.token_logprobs(z, lab, backend=backend, temperature=1.0, softcap=None,
                                logit_scale=1.0)
    assert torch.equal(a, b)
    h, w = torch.randn(4, 6, device=z.device), torch.randn(9, 6, device=z.device)
    cpo_fast.linear_token_logprobs(h, w, lab, backend=backend, temperature=1.0)
    assert seen == [None, None, None]
    c = cpo_fast.token_logprobs(z, lab, backend=backend, temperature=2.0)
    assert seen[-1] is not None and seen[-1].temperature == 2.0
    torch.testing.assert_close(c, cpo_fast.token_logprobs(z / 2, lab, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_scale_are_a_rescaling(backend):
    """Without a softcap the transform is z' = (logit_scale / T) z: same as scaling first."""
    torch.manual_seed(5)
    d = dev(backend)
    z = torch.randn(5, 40, device=d) * 3
    lab = torch.randint(0, 40, (5,), device=d)
    a = cpo_fast.token_logprobs(z, lab, backend=backend, temperature=0.8, logit_scale=-1.6)
    b = cpo_fast.token_logprobs(z * -2.0, lab, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpu" not in FUSED, reason="the C++ backend has the frozen-weight path")
@pytest.mark.parametrize("kw,frozen_used", [(head(0.7, None, 1.5), True), (head(0.7, 5.0, 1.5), False)],
                         ids=["scale", "softcap"])
def test_frozen_weight_path_exact_for_scale_skipped_for_softcap(monkeypatch, kw, frozen_used):
    from cpo_fast.cpu import linear_token_logprobs as cl

    calls = {"frozen": 0}
    real = cl.linear_token_logprobs_forward_frozen

    def counting(*a, **k):
        calls["frozen"] += 1
        return real(*a, **k)

    monkeypatch.setattr(cl, "linear_token_logprobs_forward_frozen", counting)
    c = dict(N=17, V=33, D=12, dtype=torch.float32, bias=True, n_neg_inf=0, mag=4.0,
             ignore="some", with_entropy=True, frozen=True, tf=kw, seed=11)
    h, w, b, labels, G, E = make_linear(c, "cpu")
    want = run_linear(h, w, b, labels, G, E, c, None)
    got = run_linear(h, w, b, labels, G, E, c, "cpu")
    assert calls["frozen"] == int(frozen_used)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1], floor=1.0) < 1e-5
    assert rel_err(got[2], want[2]) < 5e-5
    with pytest.raises(ValueError, match="softcap"):
        real(h, w, b, labels, -100, False, transform=HeadTransform(1.0, 5.0, 1.0))


# ----------------------------------------------------------------------------- API
@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_validation_errors_name_the_argument(op):
    z, lab = torch.randn(3, 10), torch.tensor([0, 1, 2])
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    call = ((lambda **k: cpo_fast.token_logprobs(z, lab, **k)) if op == "token_logprobs" else
            (lambda **k: cpo_fast.linear_token_logprobs(h, w, lab, **k)))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"temperature must be finite and > 0.*use 1\.0"):
            call(temperature=bad)
    for bad in (0.0, -5.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="softcap must be None or finite and > 0.*softcap=None"):
            call(softcap=bad)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=r"logit_scale must be finite.*use 1\.0"):
            call(logit_scale=bad)
    with pytest.raises(TypeError, match=r"temperature must be a Python float.*\.item\(\)"):
        call(temperature=torch.tensor(0.7))
    with pytest.raises(TypeError, match="softcap must be a float"):
        call(softcap="30")
    call(temperature=2, softcap=30, logit_scale=-1)  # ints and a negative scale are fine


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_with_transform(backend):
    torch.manual_seed(0)
    d = dev(backend)
    logits = torch.randn(2, 6, 19, device=d) * 20
    labels = torch.randint(0, 19, (2, 5), device=d)
    h, w = torch.randn(7, 8, device=d), torch.randn(19, 8, device=d)
    lab2 = torch.randint(0, 19, (7,), device=d)

    def f(z, h, w):
        lp, ent = cpo_fast.token_logprobs(z[:, :-1], labels, with_entropy=True, backend=backend,
                                          validate=False, temperature=0.7, softcap=30.0,
                                          logit_scale=1.3)
        lp2 = cpo_fast.linear_token_logprobs(h, w, lab2, backend=backend, validate=False,
                                             softcap=5.0, temperature=1.5)
        return lp.sum() + 0.1 * ent.sum() + lp2.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = [t.clone().requires_grad_(True) for t in (logits, h, w)]
    b = [t.clone().requires_grad_(True) for t in (logits, h, w)]
    torch.testing.assert_close(compiled(*a), f(*b))
    compiled(*a).backward()
    f(*b).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_with_transform(backend):
    """torch.library.opcheck of both ops' forward with the transform arguments."""
    from cpo_fast.ops.linear_token_logprobs import _fwd_op as lin_fwd
    from cpo_fast.ops.token_logprobs import _fwd_op as tok_fwd

    d = dev(backend)
    logits = torch.randn(2, 3, 13, device=d, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3), device=d)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(tok_fwd, (logits, labels, -100, True, backend, False, 0.7, 30.0, 1.3),
                          test_utils=utils)
    h = torch.randn(5, 4, device=d, requires_grad=True)
    w = torch.randn(13, 4, device=d, requires_grad=True)
    b = torch.randn(13, device=d, requires_grad=True)
    lab = torch.randint(0, 13, (5,), device=d)
    torch.library.opcheck(lin_fwd, (h, w, b, lab, -100, True, backend, 0.0, False, 0.7, 5.0, 1.3),
                          test_utils=utils)
