"""The fused-linear backends' shared gradient step (cpo_fast/_linear_common.py: ``consume_dz``)
against the float64 formulas on hypothesis-drawn tiles: a first tile writes grad_W and
grad_b, later tiles accumulate; grad_h always accumulates in fp32, on each of its three
routes (fp32 in place, a half-precision product buffer, and fp32-out addmm where torch has
it); and ``addmm_out_dtype_ok`` says where that last route exists.

    grad_W[cols] (+)= dz^T h[rows],   grad_h[rows] += dz W[cols],   grad_b[cols] (+)= sum_rows dz
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cpo_fast import _linear_common
from cpo_fast._linear_common import addmm_out_dtype_ok, consume_dz


@given(rows=st.integers(1, 9), cols=st.integers(1, 9), d=st.integers(1, 8),
       tiles=st.integers(1, 3), seed=st.integers(0, 2**16),
       wanted=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_fp32_tiles_give_the_float64_gradients(rows, cols, d, tiles, seed, wanted):
    g = torch.Generator().manual_seed(seed)
    dzs = [torch.randn(rows, cols, generator=g) for _ in range(tiles)]
    hs = [torch.randn(rows, d, generator=g) for _ in range(tiles)]
    w = torch.randn(cols, d, generator=g)
    gw = torch.full((cols, d), float("nan")) if wanted[0] else None  # written by tile 0
    gb = torch.full((cols,), float("nan")) if wanted[2] else None
    acc = [torch.zeros(rows, d) if wanted[1] else None for _ in range(tiles)]
    for k in range(tiles):
        consume_dz(dzs[k], hs[k], w, gw, acc[k], None, gb, first=k == 0)
    if gw is not None:
        want = sum(dz.double().t() @ h.double() for dz, h in zip(dzs, hs, strict=True))
        torch.testing.assert_close(gw.double(), want, rtol=1e-5, atol=1e-5)
    if gb is not None:
        torch.testing.assert_close(gb.double(), sum(dz.double().sum(0) for dz in dzs),
                                   rtol=1e-5, atol=1e-5)
    for k in range(tiles):
        if acc[k] is not None:
            torch.testing.assert_close(acc[k].double(), dzs[k].double() @ w.double(),
                                       rtol=1e-5, atol=1e-5)


def _bf16_grad_h(prod: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dz = torch.randn(8, 16, generator=g).bfloat16()
    w = torch.randn(16, 12, generator=g).bfloat16()
    acc = torch.full((8, 12), 0.5)  # accumulated into, in fp32
    consume_dz(dz, torch.zeros(8, 12).bfloat16(), w, None, acc,
               torch.empty(8, 12, dtype=torch.bfloat16) if prod else None, None, first=True)
    return acc, 0.5 + dz.double() @ w.double()


def test_half_tiles_accumulate_grad_h_in_fp32_through_a_product_buffer():
    acc, want = _bf16_grad_h(prod=True)
    assert acc.dtype == torch.float32
    # one bf16 rounding of each product entry (rel. 2^-8), none of the accumulation
    torch.testing.assert_close(acc.double(), want, rtol=2**-8, atol=2**-8 * want.abs().max())


def test_half_tiles_accumulate_grad_h_in_fp32_through_addmm_out_dtype():
    try:
        acc, want = _bf16_grad_h(prod=False)
    except (RuntimeError, TypeError) as e:  # the route addmm_out_dtype_ok rules out here
        assert not addmm_out_dtype_ok(torch.device("cpu"))
        pytest.skip(f"torch.addmm(out_dtype=float32) on CPU bf16: {e}")
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)


def test_addmm_out_dtype_ok_only_on_cuda_from_torch_2_8(monkeypatch):
    assert not addmm_out_dtype_ok(torch.device("cpu"))
    for version, ok in (("2.7.1", False), ("2.8.0", True), ("2.11.0+cu128", True),
                        ("3.0.0", True)):
        monkeypatch.setattr(_linear_common.torch, "__version__", version)
        assert addmm_out_dtype_ok(torch.device("cuda", 0)) is ok, version
