"""The C++ CPU core (cpo_fast._C via cpo_fast.cpu) against the float64 reference.

Both ops, forward values and gradients, on hypothesis-drawn shapes: odd V, V not a
multiple of the 8-wide vectors nor of the 1024-element chunks, N = 1, ignored and
all-ignored rows, non-contiguous rows (``logits[:, :-1, :]``) and a non-unit vocabulary
stride, fp32 / bf16 / fp16, logits of magnitude 1e4, -inf entries off the label. Also:
every ISA build this CPU runs (AVX-512, AVX2, generic), thread-count independence, in-place backward, and the
vectorized exp's error in ulp over a dense sweep of its input range.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpo_fast
import cpo_fast.cpu
from cpo_fast import reference
from cpo_fast._backend import cpu_extension_available
from cpo_fast.constants import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="cpo_fast._C not built")

if cpu_extension_available():
    from cpo_fast import _C
    from cpo_fast.cpu import _common as cpu_common
    from cpo_fast.cpu import linear_token_logprobs as cpu_linear
    from cpo_fast.cpu import token_logprobs as cpu_tok

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error of a stored gradient element: the kernels write the logits' dtype.
STORE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
EPS32 = 2.0**-23


ISAS = ["avx512", "avx2", "generic"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test on each kernel build (skipped where this CPU cannot run it)."""
    if request.param not in _C.isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("best")


def make_logits(B, T, V, dtype, scale, n_neg_inf, layout, labels, seed):
    """[B, T, V] logits (a view with the requested layout) and the float64 copy."""
    g = torch.Generator().manual_seed(seed)
    if layout == "vstride":  # vocabulary stride != 1: a transposed buffer
        buf = torch.randn(B, V, T, generator=g, dtype=torch.float64)
        base = buf.transpose(1, 2)
    elif layout == "shifted":  # HF's logits[:, :-1, :]
        base = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)[:, :-1, :]
    else:
        base = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    base = base * scale
    if n_neg_inf and V > 1:
        idx = torch.randint(0, V, (B, T, n_neg_inf), generator=g)
        keep = labels.clamp(min=0).unsqueeze(-1)
        idx = torch.where(idx == keep, (idx + 1) % V, idx)  # never the label's logit
        base.scatter_(-1, idx, float("-inf"))
    if layout == "vstride":
        x = base.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "shifted":
        full = torch.cat([base, base[:, :1]], dim=1).to(dtype)
        x = full[:, :-1, :]
    else:
        x = base.to(dtype)
    return x, x.double()


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    V = draw(st.sampled_from([1, 2, 7, 8, 9, 31, 33, 97, 301, 1023, 1025, 2500]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    if dtype == torch.float16:
        scale = min(scale, 3e3)
    ignore = draw(st.sampled_from(["none", "some", "all"]))
    n_neg_inf = draw(st.integers(0, 3))
    layout = draw(st.sampled_from(["contig", "shifted", "vstride"]))
    with_entropy = draw(st.booleans())
    grad_entropy = with_entropy and draw(st.booleans())
    inplace = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, V, dtype, scale, ignore, n_neg_inf, layout, with_entropy, grad_entropy, \
        inplace, seed


def draw_labels(B, T, V, ignore, seed):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore == "all":
        labels[:] = IGNORE_INDEX
    elif ignore == "some":
        labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE_INDEX
    return labels


def logits_scale(x64: torch.Tensor) -> float:
    fin = x64[torch.isfinite(x64)]
    return max(1.0, float(fin.abs().max())) if fin.numel() else 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_token_logprobs_matches_reference(isa, case):
    B, T, V, dtype, scale, ignore, n_neg_inf, layout, with_entropy, grad_ent, inplace, seed = case
    labels = draw_labels(B, T, V, ignore, seed)
    x, x64 = make_logits(B, T, V, dtype, scale, n_neg_inf, layout, labels, seed)
    S = logits_scale(x64)

    # forward
    out = cpo_fast.token_logprobs(x, labels, with_entropy=with_entropy, backend="cpu")
    lp, ent = out if with_entropy else (out, None)
    ref = reference.token_logprobs(x64, labels, with_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    # logp = z_y - lse: lse carries a float32 rounding at the logits' magnitude
    torch.testing.assert_close(lp.double(), ref[0], atol=8 * EPS32 * S + 1e-5, rtol=1e-5)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ref[1], atol=2e-5, rtol=2e-5)

    # backward: G and E drawn per row, compared with the closed form in float64
    g = torch.Generator().manual_seed(seed + 2)
    G = torch.randn(B, T, generator=g)
    E = torch.randn(B, T, generator=g) if grad_ent else None
    leaf = x.detach().clone().requires_grad_(True)
    src = leaf * 1.0 if inplace else leaf  # the in-place mode overwrites a non-leaf buffer
    out = cpo_fast.token_logprobs(src, labels, with_entropy=with_entropy, backend="cpu",
                                  inplace_backward=inplace)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * G).sum() + ((ent * E).sum() if E is not None else 0.0)
    loss.backward()
    want = reference.token_logprobs_grad(x64, labels, G.double(),
                                         E.double() if E is not None else None)
    got = leaf.grad
    assert got.dtype == dtype and torch.isfinite(got).all()
    gmax = float(G.abs().max()) + (float(E.abs().max()) * (math.log(V) + 2) if E is not None
                                   else 0.0)
    atol = 16 * EPS32 * S * gmax + 1e-6 * gmax
    torch.testing.assert_close(got.double(), want, atol=atol + 1e-30,
                               rtol=2 * STORE_TOL[dtype] + 1e-6)
    ignored = labels == IGNORE_INDEX
    assert (got[ignored] == 0).all()


def test_neg_inf_entropy_and_grad_are_finite():
    x = torch.tensor([[[0.5, float("-inf"), 2.0, float("-inf"), -1.0]]])
    labels = torch.tensor([[2]])
    leaf = x.clone().requires_grad_(True)
    lp, H = cpo_fast.token_logprobs(leaf, labels, with_entropy=True, backend="cpu")
    (lp.sum() + H.sum()).backward()
    rlp, rH = reference.token_logprobs(x.double(), labels, with_entropy=True)
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[..., [1, 3]] == 0).all()
    torch.testing.assert_close(lp.double(), rlp)
    torch.testing.assert_close(H.double(), rH)


def test_large_logits_entropy_no_cancellation():
    # Shifting every logit by 1e4 changes neither logp nor H (computed relative to the max).
    torch.manual_seed(0)
    x = torch.randn(4, 3000)
    labels = torch.randint(0, 3000, (4,))
    lp0, H0 = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend="cpu")
    lp1, H1 = cpo_fast.token_logprobs(x + 1e4, labels, with_entropy=True, backend="cpu")
    torch.testing.assert_close(H1, H0, atol=2e-5, rtol=0)
    torch.testing.assert_close(lp1, lp0, atol=2e-3, rtol=0)  # z_y and lse round at 1e4


def test_nan_logits_propagate():
    x = torch.randn(2, 50)
    x[0, 7] = float("nan")
    lp = cpo_fast.token_logprobs(x, torch.tensor([3, 4]), backend="cpu")
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1])


def test_inplace_gradient_lives_in_the_logits_buffer():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = (torch.randn(2, 5, 77) * 3).to(dtype)
        labels = torch.randint(0, 77, (2, 4))
        labels[1, 2] = IGNORE_INDEX
        grads = []
        for inplace in (False, True):
            leaf = base.clone().requires_grad_(True)
            logits = leaf * 1.0
            lp, H = cpo_fast.token_logprobs(logits[:, :-1], labels, with_entropy=True,
                                            backend="cpu", inplace_backward=inplace)
            (lp.sum() + 0.5 * H.sum()).backward()
            grads.append(leaf.grad)
            if inplace:
                assert torch.equal(logits[:, :-1], leaf.grad[:, :-1])
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independence(dtype):
    torch.manual_seed(0)
    x = (torch.randn(37, 4099) * 5).to(dtype)
    labels = torch.randint(0, 4099, (37,))
    labels[::5] = IGNORE_INDEX
    G, E = torch.randn(37), torch.randn(37)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            leaf = x.clone().requires_grad_(True)
            lp, H = cpo_fast.token_logprobs(leaf, labels, with_entropy=True, backend="cpu")
            ((lp * G).sum() + (H * E).sum()).backward()
            outs.append((lp, H, leaf.grad))
    finally:
        torch.set_num_threads(old)
    for lp, H, g in outs[1:]:  # each row is computed by one thread in a fixed order
        assert torch.equal(lp, outs[0][0]) and torch.equal(H, outs[0][1])
        assert torch.equal(g, outs[0][2])


def test_isa_builds_agree():
    torch.manual_seed(0)
    x = torch.randn(9, 2049) * 4
    labels = torch.randint(0, 2049, (9,))
    res = {}
    for name in _C.isas():
        _C.set_isa(name)
        res[name] = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend="cpu")
    _C.set_isa("best")
    assert len(res) >= 1 and _C.isa() == _C.isas()[0]
    for name in _C.isas()[1:]:
        for a, b in zip(res[_C.isas()[0]], res[name], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_isa_can_be_forced_by_name_and_environment():
    with pytest.raises(ValueError, match="not a kernel build this CPU can run"):
        _C.set_isa("avx1024")
    for name in _C.isas():
        proc = subprocess.run(
            [sys.executable, "-c", "from cpo_fast import _C; print(_C.isa())"],
            env={**os.environ, "CPO_FAST_CPU_ISA": name}, capture_output=True, text=True,
            check=True)
        assert proc.stdout.strip() == name


# ---- fused linear with known coefficients (no recompute) ----------------------------------

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


# ---- gradient-buffer pool -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_gradient_buffer_is_reused_and_fully_overwritten(monkeypatch, dtype):
    # Large enough for the pool (>= 4 MiB); rows ignored in the second step only, so a stale
    # gradient from the first step left in the reused buffer would show there.
    monkeypatch.setenv("CPO_FAST_CPU_GRAD_POOL", "2")
    cpo_fast.cpu.release_buffers()
    N, V = 96, 24_001  # >= 4 MiB in bfloat16 too
    torch.manual_seed(0)
    x = (torch.randn(N, V) * 3).to(dtype)
    addrs = []
    for ignore in (0, 7):
        labels = torch.randint(0, V, (N,))
        labels[:ignore] = IGNORE_INDEX
        G = torch.randn(N)
        leaf = x.detach().requires_grad_(True)
        (cpo_fast.token_logprobs(leaf, labels, backend="cpu") * G).sum().backward()
        got = leaf.grad
        addrs.append(got.data_ptr())
        assert got.data_ptr() % (1 << 21) == 0, "pooled buffers are 2 MiB aligned"
        want = reference.token_logprobs_grad(x.double(), labels, G.double(), None)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2 * STORE_TOL[dtype])
        assert (got[:ignore] == 0).all()
        del leaf, got
    assert addrs[0] == addrs[1], "the second step should reuse the first step's buffer"
    assert _C.pool_stats()["cached_regions"] >= 1
    assert cpo_fast.cpu.release_buffers() > 0 and _C.pool_stats()["cached_regions"] == 0


def test_pool_limit_from_environment(monkeypatch):
    cpo_fast.cpu.release_buffers()
    monkeypatch.setenv("CPO_FAST_CPU_GRAD_POOL", "0")
    t = cpu_common.empty_grad((1024, 2048), torch.float32)  # 8 MiB: pooled size
    assert t.shape == (1024, 2048) and t.dtype == torch.float32 and t.is_contiguous()
    del t
    assert _C.pool_stats()["cached_regions"] == 0, "0 turns reuse off"
    small = cpu_common.empty_grad((4, 5), torch.bfloat16)  # small: plain torch.empty
    assert small.shape == (4, 5) and small.dtype == torch.bfloat16
    monkeypatch.setenv("CPO_FAST_CPU_GRAD_POOL", "many")
    with pytest.raises(ValueError, match="CPO_FAST_CPU_GRAD_POOL"):
        cpu_common.empty_grad((1024, 2048), torch.float32)
    monkeypatch.setenv("CPO_FAST_CPU_GRAD_POOL", "-1")
    with pytest.raises(ValueError, match="CPO_FAST_CPU_GRAD_POOL"):
        cpu_common.empty_grad((1024, 2048), torch.float32)
    with pytest.raises(ValueError, match="nbytes"):
        _C.PoolBuffer(nbytes=0)


def test_backend_errors_are_clear():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(TypeError, match="float64"):
        cpu_tok.token_logprobs_forward(x, labels, IGNORE_INDEX, False)
    with pytest.raises(ValueError, match="labels"):
        cpu_tok.token_logprobs_forward(x.float(), labels[:5], IGNORE_INDEX, False)
    with pytest.raises(ValueError, match="labels"):
        cpu_tok.token_logprobs_forward(x.float(), labels.int(), IGNORE_INDEX, False)


def test_out_of_range_label_never_read_out_of_bounds():
    # validate=False skips the Python check; the kernel must not read past the row.
    x = torch.randn(2, 10)
    lp = cpo_fast.token_logprobs(x, torch.tensor([3, 10_000_000]), backend="cpu",
                                 validate=False)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1])


# ---- vectorized exp --------------------------------------------------------------------

def ulp_error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|y - exp(x)| in units of the float32 spacing at the exact result."""
    exact = np.exp(x.astype(np.float64))
    r32 = exact.astype(np.float32)  # nearest float32 (may be inf past FLT_MAX)
    spacing = np.spacing(np.abs(r32)).astype(np.float64)
    spacing = np.where(np.isfinite(spacing), spacing, np.spacing(np.float32(3.4e38)))
    return np.abs(y.astype(np.float64) - exact) / spacing


def test_vectorized_exp_within_2_ulp(isa):
    # Dense sweep: 2^22 evenly spaced points plus every float32 in a window around 0 and
    # around the subnormal range. Results that overflow must be +inf, underflow 0.
    lo, hi = -103.97, 88.72
    parts = [
        np.linspace(lo, hi, 1 << 22, dtype=np.float32),
        np.arange(-(1 << 18), 1 << 18, dtype=np.int32).view(np.float32),  # tiny |x|
        np.linspace(-1.0, 1.0, 1 << 18, dtype=np.float32),
        np.linspace(-103.97, -87.0, 1 << 18, dtype=np.float32),  # subnormal results
        np.float32([0.0, -0.0, 1.0, -1.0, hi, lo]),
    ]
    x = np.ascontiguousarray(np.concatenate(parts))
    x = x[np.isfinite(x)]
    y = np.empty_like(x)
    _C.exp_f32(x.ctypes.data, y.ctypes.data, x.size)
    err = ulp_error(x, y)
    worst = int(np.argmax(err))
    assert err[worst] <= 2.0, f"exp({x[worst]!r}) = {y[worst]!r}: {err[worst]:.2f} ulp"

    special = np.float32([np.inf, -np.inf, np.nan, 89.0, 100.0, -104.0, -200.0, -1e30])
    out = np.empty_like(special)
    _C.exp_f32(special.ctypes.data, out.ctypes.data, special.size)
    assert out[0] == np.inf and out[1] == 0 and np.isnan(out[2])
    assert out[3] == np.inf and out[4] == np.inf and out[5] == 0 and out[6] == 0 and out[7] == 0

    # The kernels' variant: inputs are log-probabilities clamped to [-88, 0]; results below
    # 2^-126 (x < -87.34) may flush to 0, and x <= -88 (where -inf lands) gives exactly 0.
    xk = x[(x <= 0) & (x >= -87.33)]
    yk = np.empty_like(xk)
    _C.exp_f32(xk.ctypes.data, yk.ctypes.data, xk.size, True)
    errk = ulp_error(xk, yk)
    worst = int(np.argmax(errk))
    assert errk[worst] <= 2.0, f"kernel exp({xk[worst]!r}): {errk[worst]:.2f} ulp"
    low = np.float32([-88.0, -90.0, -np.inf, -1e30, -87.9])
    outk = np.empty_like(low)
    _C.exp_f32(low.ctypes.data, outk.ctypes.data, low.size, True)
    assert (outk[:4] == 0).all() and 0 <= outk[4] < 2.0**-126


# ---- fused linear ------------------------------------------------------------------------

@st.composite
def linear_cases(draw):
    N = draw(st.sampled_from([1, 2, 5, 17, 40]))
    d = draw(st.sampled_from([1, 8, 33]))
    V = draw(st.sampled_from([1, 3, 31, 100, 257, 1031]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    ignore = draw(st.sampled_from(["none", "some", "all"]))
    with_entropy = draw(st.booleans())
    grad_ent = with_entropy and draw(st.booleans())
    frozen_weight = draw(st.booleans())
    blocks = draw(st.sampled_from([(7, 16), (64, 100), (2048, 2048)]))  # rows x cols
    seed = draw(st.integers(0, 2**31 - 1))
    return N, d, V, dtype, bias, ignore, with_entropy, grad_ent, frozen_weight, blocks, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=linear_cases())
def test_linear_token_logprobs_matches_reference(case, monkeypatch_blocks):
    N, d, V, dtype, has_bias, ignore, with_entropy, grad_ent, frozen, blocks, seed = case
    monkeypatch_blocks(*blocks)
    g = torch.Generator().manual_seed(seed)
    h64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    b64 = torch.randn(V, generator=g, dtype=torch.float64) if has_bias else None
    labels = draw_labels(1, N, V, ignore, seed)[0]
    h, w = h64.to(dtype).requires_grad_(True), w64.to(dtype).requires_grad_(not frozen)
    b = b64.to(dtype).requires_grad_(True) if has_bias else None
    out = cpo_fast.linear_token_logprobs(h, w, labels, bias=b, with_entropy=with_entropy,
                                         backend="cpu")
    lp, ent = out if with_entropy else (out, None)

    # the reference sees the same (rounded) inputs, in float64
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = b.detach().double().requires_grad_(True) if has_bias else None
    rlp, rent = reference.linear_token_logprobs(hr, wr, labels, bias=br, with_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, atol=1e-4, rtol=1e-4)
    if with_entropy:
        torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-4)

    G = torch.randn(N, generator=g)
    E = torch.randn(N, generator=g) if grad_ent else None
    ((lp * G).sum() + ((ent * E).sum() if E is not None else 0.0)).backward()
    ((rlp * G.double()).sum() + ((rent * E.double()).sum() if E is not None else 0.0)).backward()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    assert h.grad.dtype == dtype
    if frozen:
        assert w.grad is None
    else:
        assert w.grad.dtype == dtype
        torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
    if has_bias:
        torch.testing.assert_close(b.grad.double(), br.grad, **tol)


@pytest.fixture
def monkeypatch_blocks():
    """Force the fused-linear block shape through the backend's override_config."""
    with contextlib.ExitStack() as stack:

        def set_blocks(rows: int, cols: int) -> None:
            stack.enter_context(cpu_linear.override_config(block_rows=rows, block_cols=cols))

        yield set_blocks


def test_linear_backend_ignores_grad_skip_threshold_exactly():
    torch.manual_seed(0)
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (6,))
    grads = []
    for thr in (0.0, 0.5):
        h.grad = w.grad = None
        cpo_fast.linear_token_logprobs(h, w, labels, backend="cpu",
                                       grad_skip_threshold=thr).sum().backward()
        grads.append((h.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# ---- fused linear, frozen weight (the LoRA case) ------------------------------------------

@st.composite
def frozen_cases(draw):
    N = draw(st.sampled_from([1, 3, 17, 40]))
    d = draw(st.sampled_from([1, 8, 33]))
    V = draw(st.sampled_from([1, 2, 31, 100, 257, 1031]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    ignore = draw(st.sampled_from(["none", "some", "all"]))
    with_entropy = draw(st.booleans())
    grad_ent = with_entropy and draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 3.0, 30.0]))  # logits up to ~100: many max changes
    blocks = draw(st.sampled_from([(1, 1), (7, 16), (5, 9), (64, 100), (2048, 2048)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return N, d, V, dtype, bias, ignore, with_entropy, grad_ent, scale, blocks, seed


@pytest.fixture
def frozen_path_spy(monkeypatch):
    """Counts frozen forwards; the backend backward raises (the fast path must not call it)."""
    calls = {"frozen": 0}
    real = cpu_linear.linear_token_logprobs_forward_frozen

    def counting(*args, **kwargs):
        calls["frozen"] += 1
        return real(*args, **kwargs)

    def no_backward(*args, **kwargs):
        raise AssertionError("the frozen-weight path must not call the backend backward")

    monkeypatch.setattr(cpu_linear, "linear_token_logprobs_forward_frozen", counting)
    monkeypatch.setattr(cpu_linear, "linear_token_logprobs_backward", no_backward)
    return calls


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frozen_cases())
def test_linear_frozen_weight_fast_path_matches_reference(case, monkeypatch_blocks,
                                                          frozen_path_spy):
    N, d, V, dtype, has_bias, ignore, with_entropy, grad_ent, scale, blocks, seed = case
    monkeypatch_blocks(*blocks)
    g = torch.Generator().manual_seed(seed)
    h64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d) * scale
    b64 = torch.randn(V, generator=g, dtype=torch.float64) * scale if has_bias else None
    labels = draw_labels(1, N, V, ignore, seed)[0]
    h = h64.to(dtype).requires_grad_(True)
    w = w64.to(dtype)  # frozen, as is the bias
    b = b64.to(dtype) if has_bias else None
    before = frozen_path_spy["frozen"]
    out = cpo_fast.linear_token_logprobs(h, w, labels, bias=b, with_entropy=with_entropy,
                                         backend="cpu")
    assert frozen_path_spy["frozen"] == before + 1
    lp, ent = out if with_entropy else (out, None)

    hr = h.detach().double().requires_grad_(True)
    br = b.double() if has_bias else None
    rlp, rent = reference.linear_token_logprobs(hr, w.double(), labels, bias=br,
                                                with_entropy=True)
    S = max(1.0, float((hr.detach() @ w.double().T).abs().max())) if V and N else 1.0
    torch.testing.assert_close(lp.double(), rlp, atol=1e-4 + 8 * EPS32 * S, rtol=1e-4)
    if with_entropy:
        torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-4)

    G = torch.randn(N, generator=g)
    E = torch.randn(N, generator=g) if grad_ent else None
    ((lp * G).sum() + ((ent * E).sum() if E is not None else 0.0)).backward()
    ((rlp * G.double()).sum() + ((rent * E.double()).sum() if E is not None else 0.0)).backward()
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()
    wmax = float(w.double().abs().max()) if V else 1.0
    if dtype == torch.float32:
        tol = dict(atol=1e-4 * wmax * (1 + math.log(V + 1)), rtol=1e-4)
    else:  # the gradient is stored in bf16
        tol = dict(atol=2e-2 * wmax, rtol=2e-2)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    assert (h.grad[labels == IGNORE_INDEX] == 0).all()


def test_linear_frozen_path_only_when_weight_and_bias_frozen(monkeypatch):
    calls = {"frozen": 0, "backward": 0}
    real_fwd = cpu_linear.linear_token_logprobs_forward_frozen
    real_bwd = cpu_linear.linear_token_logprobs_backward

    def fwd(*args, **kwargs):
        calls["frozen"] += 1
        return real_fwd(*args, **kwargs)

    def bwd(*args, **kwargs):
        calls["backward"] += 1
        return real_bwd(*args, **kwargs)

    monkeypatch.setattr(cpu_linear, "linear_token_logprobs_forward_frozen", fwd)
    monkeypatch.setattr(cpu_linear, "linear_token_logprobs_backward", bwd)
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (6,))

    def run(h_grad: bool, w_grad: bool, b_grad: bool | None, grad_mode: bool = True):
        h = torch.randn(6, 8, requires_grad=h_grad)
        w = torch.randn(50, 8, requires_grad=w_grad)
        b = None if b_grad is None else torch.randn(50, requires_grad=b_grad)
        calls.update(frozen=0, backward=0)
        with torch.set_grad_enabled(grad_mode):
            lp = cpo_fast.linear_token_logprobs(h, w, labels, bias=b, backend="cpu")
            if lp.requires_grad:
                lp.sum().backward()
        return dict(calls)

    assert run(True, False, None) == {"frozen": 1, "backward": 0}
    assert run(True, False, False) == {"frozen": 1, "backward": 0}
    assert run(True, True, None) == {"frozen": 0, "backward": 1}  # trained weight: recompute
    assert run(True, False, True) == {"frozen": 0, "backward": 1}  # trained bias
    assert run(False, True, None) == {"frozen": 0, "backward": 1}
    assert run(False, False, None) == {"frozen": 0, "backward": 0}  # nothing to train
    assert run(True, False, None, grad_mode=False) == {"frozen": 0, "backward": 0}


def test_linear_frozen_path_gradient_equals_recompute_path():
    # Same inputs through both paths (a trainable weight forces the recompute one).
    torch.manual_seed(0)
    h0 = torch.randn(33, 24) * 2
    w0 = torch.randn(3001, 24)
    labels = torch.randint(0, 3001, (33,))
    labels[::4] = IGNORE_INDEX
    G, E = torch.randn(33), torch.randn(33)
    grads = []
    for trained in (False, True):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(trained)
        lp, H = cpo_fast.linear_token_logprobs(h, w, labels, with_entropy=True, backend="cpu")
        ((lp * G).sum() + (H * E).sum()).backward()
        grads.append((lp.detach(), H.detach(), h.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_linear_frozen_opcheck():
    """Schema, fake tensors (the [N, d] pw/plw outputs) and autograd registration agree."""
    from cpo_fast.ops.linear_token_logprobs import _fwd_op

    torch.manual_seed(0)
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(40, 8)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 39, 0])
    for with_entropy in (False, True):
        torch.library.opcheck(
            _fwd_op, (h, w, torch.empty(0), labels, IGNORE_INDEX, with_entropy, "cpu", 0.0, True)
        )


def test_linear_frozen_path_under_torch_compile(frozen_path_spy):
    """The wrapper's path decision traces (fullgraph) and the compiled graph takes it."""
    torch.manual_seed(0)
    w = torch.randn(57, 8)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 56, 0, 3])

    def f(h):
        lp, H = cpo_fast.linear_token_logprobs(h, w, labels, with_entropy=True, backend="cpu",
                                               validate=False)
        return (lp * torch.arange(6.0)).sum() + 0.1 * H.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    h0 = torch.randn(6, 8)
    h1, h2 = h0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    compiled(h1).backward()
    n_compiled = frozen_path_spy["frozen"]
    f(h2).backward()
    assert n_compiled >= 1 and frozen_path_spy["frozen"] == n_compiled + 1
    torch.testing.assert_close(h1.grad, h2.grad)


# ---- tuning knobs and the bridge -----------------------------------------------------------

def test_config_reads_env_at_call_time_and_override_wins(monkeypatch):
    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_ROWS", "7")
    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_COLS", "13")
    assert cpu_linear.default_config() == cpu_linear.Config(block_rows=7, block_cols=13)
    with cpu_linear.override_config(block_cols=5):
        assert cpu_linear.default_config() == cpu_linear.Config(block_rows=7, block_cols=5)
    assert cpu_linear.default_config().block_cols == 13  # restored on exit
    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_ROWS", "seven")
    with pytest.raises(ValueError, match="CPO_FAST_CPU_BLOCK_ROWS"):
        cpu_linear.default_config()
    with pytest.raises(TypeError, match="unknown field"), cpu_tok.override_config(tile=1):
        pass


def test_tiny_blocks_and_one_thread_give_the_same_result():
    torch.manual_seed(0)
    h, w = torch.randn(9, 8), torch.randn(45, 8)
    labels = torch.tensor([0, 5, IGNORE_INDEX, 44, 3, 3, 1, IGNORE_INDEX, 20])
    big = cpo_fast.linear_token_logprobs(h, w, labels, with_entropy=True, backend="cpu")
    with cpu_linear.override_config(block_rows=2, block_cols=3, num_threads=1):
        small = cpo_fast.linear_token_logprobs(h, w, labels, with_entropy=True, backend="cpu")
    for a, b in zip(big, small, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bridge_takes_named_arguments_and_dtype_names():
    assert _C.DType.bfloat16 != _C.DType.float32
    x = torch.randn(1, 2, 5)
    labels = torch.tensor([1, 4])
    logp, lse = torch.empty(2), torch.empty(2)
    _C.token_logprobs_forward(
        logits=x.data_ptr(), dtype=_C.DType.float32, B=1, T=2, V=5, stride_b=10, stride_t=5,
        stride_v=1, labels=labels.data_ptr(), ignore_index=IGNORE_INDEX, logp=logp.data_ptr(),
        entropy=0, lse=lse.data_ptr(), nthreads=1)
    torch.testing.assert_close(logp, reference.token_logprobs(x[0], labels))
    with pytest.raises(TypeError):  # an integer is not a dtype name any more
        _C.token_logprobs_forward(x.data_ptr(), 0, 1, 2, 5, 10, 5, 1, labels.data_ptr(),
                                  IGNORE_INDEX, logp.data_ptr(), 0, lse.data_ptr(), 1)
    with pytest.raises(ValueError, match="row_offset"):
        _C.block_forward(block=x.data_ptr(), rows=1, cols=5, ld=5, col0=0,
                         labels=labels.data_ptr(), ignore_index=IGNORE_INDEX, with_entropy=False,
                         m=lse.data_ptr(), s=lse.data_ptr(), a=lse.data_ptr(),
                         zy=lse.data_ptr(), row_offset=-1)
