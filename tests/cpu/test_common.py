"""What both CPU op modules share (cpo_fast/cpu/_common.py, cpo_fast/cpu/__init__.py) and the
C++ core under them (cpo_fast._C, built from csrc/): every ISA build this CPU runs (AVX-512,
AVX2, generic) agrees and can be forced, the gradient-buffer pool, the vectorized exp's
error in ulp over a dense sweep of its input range, and the bridge's named arguments. The
ops on this backend are tested in tests/ops/.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cpo_fast
import cpo_fast.cpu
from cpo_fast import reference
from cpo_fast._backend import cpu_extension_available
from cpo_fast.constants import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="cpo_fast._C not built")

if cpu_extension_available():
    from cpo_fast import _C
    from cpo_fast.cpu import _common as cpu_common

# Relative error of a stored gradient element: the kernels write the logits' dtype.
STORE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


# ---- ISA builds ----------------------------------------------------------------------------

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


# ---- vectorized exp --------------------------------------------------------------------

def ulp_error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|y - exp(x)| in units of the float32 spacing at the exact result."""
    exact = np.exp(x.astype(np.float64))
    r32 = exact.astype(np.float32)  # nearest float32 (may be inf past FLT_MAX)
    spacing = np.spacing(np.abs(r32)).astype(np.float64)
    spacing = np.where(np.isfinite(spacing), spacing, np.spacing(np.float32(3.4e38)))
    return np.abs(y.astype(np.float64) - exact) / spacing


def test_vectorized_exps_within_their_bounds(isa):
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

    # The kernels' variant (a degree-5 polynomial, 2.5 ulp): inputs are log-probabilities
    # clamped to [-88, 0], or up to 30 (a later chunk's terms relative to a row's running
    # max in the one-sweep forward); results below 2^-126 (x < -87.34) may flush to 0, and
    # x <= -88 (where -inf lands) gives exactly 0.
    xk = x[(x <= 0) & (x >= -87.33)]
    xs = np.concatenate([xk, np.linspace(0.0, 30.0, 1 << 20, dtype=np.float32)])
    yk = np.empty_like(xs)
    _C.exp_f32(xs.ctypes.data, yk.ctypes.data, xs.size, variant=1)
    errk = ulp_error(xs, yk)
    worst = int(np.argmax(errk))
    assert errk[worst] <= 2.5, f"kernel exp({xs[worst]!r}): {errk[worst]:.2f} ulp"
    low = np.float32([-88.0, -90.0, -np.inf, -1e30, -87.9])
    outk = np.empty_like(low)
    _C.exp_f32(low.ctypes.data, outk.ctypes.data, low.size, variant=1)
    assert (outk[:4] == 0).all() and 0 <= outk[4] < 2.0**-126

    # The bfloat16 backward's cubic: relative error <= 8e-5 (7.5e-5 designed), a 26th of
    # bfloat16's rounding, with the same domain and flush.
    y16 = np.empty_like(xk)
    _C.exp_f32(xk.ctypes.data, y16.ctypes.data, xk.size, variant=2)
    rel = np.abs(y16.astype(np.float64) / np.exp(xk.astype(np.float64)) - 1.0)
    worst = int(np.argmax(rel))
    assert rel[worst] <= 8e-5, f"bf16 exp({xk[worst]!r}): relative error {rel[worst]:.2e}"
    assert rel.max() > 1e-5  # the cubic is in use, not kexp
    _C.exp_f32(low.ctypes.data, outk.ctypes.data, low.size, variant=2)
    assert (outk[:4] == 0).all() and 0 <= outk[4] < 2.0**-126
    with pytest.raises(ValueError, match="variant"):
        _C.exp_f32(low.ctypes.data, outk.ctypes.data, low.size, variant=3)


# ---- the bridge -----------------------------------------------------------------------------

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
