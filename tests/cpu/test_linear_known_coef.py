"""Fused linear with known coefficients, no recompute (cpo_fast/cpu/linear_known_coef.py),
against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpo_fast import reference
from cpo_fast._backend import cpu_extension_available
from cpo_fast.constants import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="cpo_fast._C not built")


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.sampled_from([1, 5, 33]), d=st.sampled_from([1, 8, 40]),
       V=st.sampled_from([1, 7, 300, 1031]), dtype=st.sampled_from([torch.float32,
                                                                    torch.bfloat16]),
       with_ent=st.booleans(), n_ignored=st.integers(0, 3), block_rows=st.sampled_from([1, 4, None]),
       seed=st.integers(0, 2**16))
def test_linear_with_known_coefficients_matches_reference(N, d, V, dtype, with_ent, n_ignored,
                                                          block_rows, seed):
    from cpo_fast.cpu.linear_known_coef import linear_token_logprobs_with_grads

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * 2).to(dtype)
    w = (torch.randn(V, d, generator=g) / max(d, 1) ** 0.5 * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[: min(n_ignored, N)] = IGNORE_INDEX
    G = torch.randn(N, generator=g)
    E = torch.randn(N, generator=g) if with_ent else None
    lp, H, gh, gw = linear_token_logprobs_with_grads(h, w, labels, G, E, block_rows=block_rows)

    h64 = h.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    rlp, rH = reference.linear_token_logprobs(h64, w64, labels, with_entropy=True)
    loss = (rlp * G.double()).sum() + ((rH * E.double()).sum() if with_ent else 0.0)
    loss.backward()
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=2e-5, rtol=2e-5)
    if with_ent:
        torch.testing.assert_close(H.double(), rH.detach(), atol=5e-5, rtol=5e-5)
    else:
        assert H is None
    assert gh.dtype == dtype and gw.dtype == dtype
    rtol = 1e-4 if dtype == torch.float32 else 2**-7
    for got, want in ((gh, h64.grad), (gw, w64.grad)):
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(got.double(), want, atol=1e-4 * scale + 1e-6, rtol=rtol)


def test_linear_with_known_coefficients_errors():
    from cpo_fast.cpu.linear_known_coef import linear_token_logprobs_with_grads

    h, w, y, G = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int64), torch.ones(3)
    with pytest.raises(ValueError, match="same d"):
        linear_token_logprobs_with_grads(h, torch.randn(5, 3), y, G)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_token_logprobs_with_grads(h, w.double(), y, G)
    with pytest.raises(ValueError, match="coef_logp"):
        linear_token_logprobs_with_grads(h, w, y, G[:2])
    with pytest.raises(ValueError, match="block_rows"):
        linear_token_logprobs_with_grads(h, w, y, G, block_rows=0)
