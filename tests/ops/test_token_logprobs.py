"""The fused logits path against the float64 reference: values and gradients."""

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

BACKENDS = kernel_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend on this machine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative error of the stored gradient (the kernels write the logits' dtype).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def dev(backend: str) -> str:
    return "cpu" if backend == "cpu" else device()


@contextlib.contextmanager
def max_block(block: int | None):
    """Force the Triton kernels to walk the vocabulary in many small chunks."""
    if block is None or "triton" not in BACKENDS:
        yield
        return
    from cpo_fast.kernels import token_logprobs as tk

    with tk.override_config(block_v=block):
        yield


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    V = draw(st.sampled_from([1, 2, 7, 31, 33, 97, 129, 301]))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    if dtype == torch.float16 and scale > 1e3:
        scale = 3e3
    ignore = draw(st.sampled_from(["none", "some", "all"]))
    n_neg_inf = draw(st.integers(0, 3))
    shifted = draw(st.booleans())  # HF-style logits[:, :-1, :] view, no copy
    with_entropy = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, V, dtype, scale, ignore, n_neg_inf, shifted, with_entropy, seed


def make(B, T, V, dtype, scale, ignore, n_neg_inf, shifted, seed, dev):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    if V > 1:
        for _ in range(n_neg_inf):  # -inf entries away from the label
            b, t = int(torch.randint(0, B, (1,), generator=g)), int(torch.randint(0, T, (1,), generator=g))
            v = (int(labels[b, t]) + 1 + int(torch.randint(0, V - 1, (1,), generator=g))) % V
            full[b, t, v] = -math.inf
    if ignore == "some":
        labels[torch.rand(B, T, generator=g) < 0.4] = -100
    elif ignore == "all":
        labels[:] = -100
    full = full.to(dtype).to(dev)
    logits = full[:, :-1, :] if shifted else full[:, :-1, :].contiguous()
    return logits, labels.to(dev)


@pytest.mark.parametrize("block", [16, None], ids=["chunks16", "default-chunks"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(case=cases())
def test_values_and_grads_match_float64(backend, block, case):
    with max_block(block):
        _check_case(backend, case)


def _check_case(backend, case):
    B, T, V, dtype, scale, ignore, n_neg_inf, shifted, with_entropy, seed = case
    logits, labels = make(B, T, V, dtype, scale, ignore, n_neg_inf, shifted, seed, dev(backend))
    if shifted and B > 1 and V > 1:
        assert not logits.is_contiguous()
    x = logits.detach().clone().requires_grad_(True) if not shifted else logits.detach().requires_grad_(True)
    out = cpo_fast.token_logprobs(x, labels, with_entropy=with_entropy, backend=backend)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference.token_logprobs(ref_in, labels, with_entropy=with_entropy)
    lp, rlp = (out[0], ref[0]) if with_entropy else (out, ref)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape

    fin = torch.isfinite(ref_in).all(-1)
    zmax = ref_in.detach()[torch.isfinite(ref_in.detach())].abs().max().item() if fin.any() else 1.0
    atol = 4e-6 * (1.0 + zmax)
    torch.testing.assert_close(lp.double(), rlp.detach(), atol=atol, rtol=1e-6)
    if with_entropy:
        torch.testing.assert_close(out[1].double(), ref[1].detach(), atol=atol + 1e-5, rtol=1e-5)
    ignored = labels == -100
    assert (lp[ignored] == 0).all()

    g = torch.Generator().manual_seed(seed + 1)
    G = torch.randn(B, T, generator=g, dtype=torch.float64).to(logits.device)
    E = torch.randn(B, T, generator=g, dtype=torch.float64).to(logits.device)
    loss = (lp * G.float()).sum() + ((out[1] * E.float()).sum() if with_entropy else 0)
    rloss = (rlp * G).sum() + ((ref[1] * E).sum() if with_entropy else 0)
    loss.backward()
    rloss.backward()
    scale_g = (G.abs().max() + (E.abs().max() * (2 + math.log(V)) if with_entropy else 0)).item()
    err = (x.grad.double() - ref_in.grad).abs().max().item()
    assert err <= GRAD_TOL[dtype] * scale_g + 1e-12, err
    assert (x.grad[ignored] == 0).all()
    # The closed form of the gradient (docs/math.md) is what autograd of the reference gives.
    closed = reference.token_logprobs_grad(ref_in.detach(), labels, G, E if with_entropy else None)
    torch.testing.assert_close(closed, ref_in.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_inplace_backward_writes_over_logits(backend, dtype, with_entropy):
    torch.manual_seed(0)
    B, T, V = 2, 4, 45
    base = (torch.randn(B, T + 1, V) * 3).to(dtype).to(dev(backend))
    labels = torch.randint(0, V, (B, T), device=base.device)
    labels[0, 1] = -100

    def run(inplace: bool):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0  # a non-leaf buffer the op may overwrite
        view = logits[:, :-1, :]
        out = cpo_fast.token_logprobs(view, labels, with_entropy=with_entropy, backend=backend,
                                      inplace_backward=inplace)
        lp, ent = out if with_entropy else (out, None)
        loss = (lp * torch.arange(B * T, device=lp.device).view(B, T)).sum()
        if ent is not None:
            loss = loss + ent.sum()
        loss.backward()
        return leaf.grad, logits

    g_ref, logits_ref = run(False)
    g_in, logits_in = run(True)
    torch.testing.assert_close(g_in, g_ref, atol=0, rtol=0)
    assert torch.equal(logits_in[:, :-1], g_in[:, :-1]), "gradient must live in the logits buffer"
    assert not torch.equal(logits_ref, logits_in)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_invariance_and_row_independence(backend):
    torch.manual_seed(1)
    N, V = 6, 77
    logits = torch.randn(N, V, device=dev(backend))
    labels = torch.randint(0, V, (N,), device=logits.device)
    a = cpo_fast.token_logprobs(logits, labels, backend=backend)
    shift = torch.randn(N, 1, device=logits.device) * 50
    b = cpo_fast.token_logprobs(logits + shift, labels, backend=backend)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    perm = torch.randperm(N, device=logits.device)
    c = cpo_fast.token_logprobs(logits[perm], labels[perm], backend=backend)
    torch.testing.assert_close(c, a[perm])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_empty(backend):
    d = dev(backend)
    logits = torch.randn(2, 3, 4, 11, device=d)
    labels = torch.randint(0, 11, (2, 3, 4), device=d)
    out = cpo_fast.token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(out, reference.token_logprobs(logits, labels))
    empty = cpo_fast.token_logprobs(torch.randn(0, 5, device=d), torch.zeros(0, dtype=torch.long, device=d),
                                    backend=backend)
    assert empty.shape == (0,)


def test_errors_name_the_argument():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside the vocabulary \[0, 10\)"):
        cpo_fast.token_logprobs(logits, torch.tensor([0, 10, 2]), backend="reference")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cpo_fast.token_logprobs(logits, torch.tensor([0, -3, 2]), backend="reference")
    with pytest.raises(ValueError, match="must equal logits.shape"):
        cpo_fast.token_logprobs(logits, torch.tensor([0, 1]), backend="reference")
    with pytest.raises(TypeError, match="floating-point"):
        cpo_fast.token_logprobs(torch.ones(3, 10, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="floating-point"):
        cpo_fast.token_logprobs(torch.ones(3, 10, dtype=torch.bool), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        cpo_fast.token_logprobs(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="not one of"):
        cpo_fast.token_logprobs(logits, torch.tensor([0, 1, 2]), backend="cuda-magic")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cpo_fast.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


def test_env_variable_overrides_default(monkeypatch):
    monkeypatch.setenv("CPO_FAST_BACKEND", "reference")
    from cpo_fast._backend import resolve_backend

    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("CPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CPO_FAST_BACKEND"):
        resolve_backend(None, torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_traces_the_custom_op(backend):
    torch.manual_seed(0)
    d = dev(backend)
    logits = torch.randn(2, 6, 19, device=d)
    labels = torch.randint(0, 19, (2, 5), device=d)

    def f(z):
        lp, ent = cpo_fast.token_logprobs(z[:, :-1], labels, with_entropy=True, backend=backend,
                                          validate=False)
        return (lp.sum(-1) * torch.tensor([1.0, -2.0], device=d)).sum() + 0.1 * ent.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(x1), f(x2))
    compiled(x1).backward()
    f(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake tensors and autograd registration agree."""
    d = dev(backend)
    logits = torch.randn(2, 3, 13, device=d, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3), device=d)
    from cpo_fast.ops.token_logprobs import _fwd_op

    torch.library.opcheck(_fwd_op, (logits, labels, -100, True, backend, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
