"""``linear_token_logprobs(..., grad_coef=...)``: the gradient formed in the forward pass
(cpo_fast/ops/linear_token_logprobs_known.py) on every fused backend against the float64
reference, with small row blocks, head transforms, a bias, ignored rows and the entropy;
the backward's check of the announced coefficients (a wrong announcement still gives the
exact gradient, with a warning); argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import dev, kernel_backends, transforms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.ops import linear_token_logprobs_known as known

FUSED = kernel_backends()
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend on this machine")


def _case(N, d, V, dtype, n_ignored, with_bias, seed, device):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * 2).to(dtype)
    w = (torch.randn(V, d, generator=g) / d ** 0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g)).to(dtype) if with_bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[: min(n_ignored, N)] = IGNORE_INDEX
    G, E = torch.randn(N, generator=g), torch.randn(N, generator=g)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(h), to(w), to(b), to(y), to(G), to(E)


def _reference(h, w, b, y, G, E, tf):
    leaves = [t.detach().cpu().double().requires_grad_(True) if t is not None else None
              for t in (h, w, b)]
    lp, H = reference.linear_token_logprobs(leaves[0], leaves[1], y.cpu(), bias=leaves[2],
                                            with_entropy=True, **tf)
    loss = (lp * G.cpu().double()).sum() + (0.0 if E is None else (H * E.cpu().double()).sum())
    loss.backward()
    return lp.detach(), H.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(N=st.sampled_from([1, 5, 33]), d=st.sampled_from([1, 8, 40]),
       V=st.sampled_from([1, 7, 300]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       with_ent=st.booleans(), with_bias=st.booleans(), n_ignored=st.integers(0, 3),
       block_bytes=st.sampled_from([4, 4 * 7 * 4, 1 << 26]), tf=st.one_of(st.just({}), transforms()),
       seed=st.integers(0, 2**16))
def test_known_coefficients_match_reference(backend, N, d, V, dtype, with_ent, with_bias,
                                            n_ignored, block_bytes, tf, seed, monkeypatch):
    monkeypatch.setenv("CPO_FAST_KNOWN_BLOCK_BYTES", str(block_bytes))  # 1, 7 or all rows
    h, w, b, y, G, E = _case(N, d, V, dtype, n_ignored, with_bias, seed, dev(backend))
    E = E if with_ent else None
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    with warnings.catch_warnings():  # the announced coefficients are right: no recompute
        warnings.filterwarnings("error", message=".*recomputing it exactly")
        out = cpo_fast.linear_token_logprobs(leaves[0], leaves[1], y, bias=leaves[2],
                                             with_entropy=with_ent, backend=backend,
                                             grad_coef=G, grad_coef_entropy=E, **tf)
        lp, H = out if with_ent else (out, None)
        loss = (lp * G).sum() + (0.0 if E is None else (H * E).sum())
        loss.backward()
    rlp, rH, rgrads = _reference(h, w, b, y, G, E, tf)
    torch.testing.assert_close(lp.detach().cpu().double(), rlp, atol=5e-5, rtol=5e-5)
    if with_ent:
        torch.testing.assert_close(H.detach().cpu().double(), rH, atol=1e-4, rtol=1e-4)
    rtol = 1e-4 if dtype == torch.float32 else 2**-6
    for leaf, want in zip(leaves, rgrads, strict=True):
        if leaf is None:
            continue
        assert leaf.grad.dtype == dtype
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(leaf.grad.cpu().double(), want, rtol=rtol,
                                   atol=(1e-4 if dtype == torch.float32 else 2e-2) * scale + 1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_wrong_coefficients_recompute_exactly_with_a_warning(backend):
    h, w, b, y, G, _ = _case(9, 8, 50, torch.float32, 2, True, 3, dev(backend))
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lp = cpo_fast.linear_token_logprobs(leaves[0], leaves[1], y, bias=leaves[2], backend=backend,
                                        grad_coef=torch.ones_like(G))  # announced: all ones
    with pytest.warns(UserWarning, match="recomputing it exactly"):
        (lp * G).sum().backward()  # backpropagated: G
    _, _, rgrads = _reference(h, w, b, y, G, None, {})
    for leaf, want in zip(leaves, rgrads, strict=True):
        torch.testing.assert_close(leaf.grad.cpu().double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_known_path_is_taken_only_for_a_trained_head(backend, monkeypatch):
    calls = []
    real = known.forward_with_grads
    monkeypatch.setattr(known, "forward_with_grads", lambda *a: calls.append(1) or real(*a))
    h, w, _, y, G, _ = _case(4, 8, 20, torch.float32, 0, False, 0, dev(backend))
    hg = h.clone().requires_grad_(True)
    cpo_fast.linear_token_logprobs(hg, w.clone().requires_grad_(True), y, backend=backend,
                                   grad_coef=G).sum()
    assert calls == [1]
    cpo_fast.linear_token_logprobs(hg, w, y, backend=backend, grad_coef=G)  # frozen head
    with torch.no_grad():
        cpo_fast.linear_token_logprobs(hg, w.clone().requires_grad_(True), y, backend=backend,
                                       grad_coef=G)
    assert calls == [1]


def test_grad_coef_errors():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="grad_coef must be a float tensor shaped like labels"):
        cpo_fast.linear_token_logprobs(h, w, y, grad_coef=torch.ones(2))
    with pytest.raises(ValueError, match="without grad_coef"):
        cpo_fast.linear_token_logprobs(h, w, y, grad_coef_entropy=torch.ones(3))
    with pytest.raises(ValueError, match="needs with_entropy=True"):
        cpo_fast.linear_token_logprobs(h, w, y, grad_coef=torch.ones(3),
                                       grad_coef_entropy=torch.ones(3))


def test_block_rows_follow_the_budget(monkeypatch):
    assert known.block_rows(V=1000, N=10**6) == known.BLOCK_BYTES // 4000
    monkeypatch.setenv("CPO_FAST_KNOWN_BLOCK_BYTES", "1")
    assert known.block_rows(V=1000, N=7) == 1
    monkeypatch.setenv("CPO_FAST_KNOWN_BLOCK_BYTES", str(1 << 40))
    assert known.block_rows(V=1000, N=7) == 7


@pytest.mark.parametrize("backend", FUSED)
def test_a_loss_scaled_after_the_announcement_keeps_the_fast_path(backend):
    h, w, _, y, G, E = _case(6, 8, 40, torch.float32, 1, False, 5, dev(backend))
    leaves = [t.clone().requires_grad_(True) for t in (h, w)]
    lp, H = cpo_fast.linear_token_logprobs(*leaves, y, backend=backend, with_entropy=True,
                                           grad_coef=G, grad_coef_entropy=E)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*recomputing it exactly")
        (((lp * G).sum() + (H * E).sum()) * 0.25).backward()  # e.g. 1 / accumulation steps
    _, _, rgrads = _reference(h, w, None, y, G, E, {})
    for leaf, want in zip(leaves, rgrads[:2], strict=True):
        torch.testing.assert_close(leaf.grad.cpu().double(), want * 0.25, rtol=1e-4, atol=1e-5)
