"""``token_logprobs`` (cpo_fast/ops/token_logprobs.py) on every backend against the float64
reference: values and gradients, in-place backward, layouts, errors, torch.compile and
opcheck; the Triton backend (natively on CUDA, else under Triton's interpreter) and the C++
CPU backend (every ISA build, thread counts, its own module's errors); the head transforms
(temperature, softcap, logit_scale); non-finite logits; hypothesis-drawn adversarial inputs
(the property in tests/fuzz_cases.py).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from conftest import dev, draw_labels, head, kernel_backends, transforms
from fuzz_cases import FUZZ_DTYPES, FUZZ_SETTINGS, check_token_case, token_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpo_fast
from cpo_fast import reference
from cpo_fast._backend import cpu_extension_available
from cpo_fast._transform import HeadTransform
from cpo_fast.constants import IGNORE_INDEX

FUSED = kernel_backends()
BACKENDS = ["reference", *FUSED]
needs_fused = pytest.mark.skipif(not FUSED, reason="no fused backend on this machine")
needs_cpu = pytest.mark.skipif(not cpu_extension_available(), reason="cpo_fast._C not built")

if cpu_extension_available():
    from cpo_fast.cpu import token_logprobs as cpu_tok

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_OF = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative error of the stored gradient (the kernels write the logits' dtype).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Relative error of a stored gradient element: the kernels write the logits' dtype.
STORE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
EPS32 = 2.0**-23


# ---- every fused backend -------------------------------------------------------------------

@contextlib.contextmanager
def max_block(block: int | None):
    """Force the Triton kernels to walk the vocabulary in many small chunks."""
    if block is None or "triton" not in FUSED:
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
    dtype = DTYPE_OF[draw(st.sampled_from(list(DTYPE_OF)))]
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


@needs_fused
@pytest.mark.parametrize("block", [16, None], ids=["chunks16", "default-chunks"])
@pytest.mark.parametrize("backend", FUSED)
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
    # p = exp(z - lse) from the saved float32 lse: z - lse carries a rounding at the
    # logits' magnitude (about 1e-3 at |z| = 1e4), as in the CPU test below
    assert err <= (GRAD_TOL[dtype] + 8 * EPS32 * zmax) * scale_g + 1e-12, err
    assert (x.grad[ignored] == 0).all()
    # The closed form of the gradient (docs/math.md) is what autograd of the reference gives.
    closed = reference.token_logprobs_grad(ref_in.detach(), labels, G, E if with_entropy else None)
    torch.testing.assert_close(closed, ref_in.grad, atol=1e-9, rtol=1e-9)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
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


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
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


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_leading_dims_and_empty(backend):
    d = dev(backend)
    logits = torch.randn(2, 3, 4, 11, device=d)
    labels = torch.randint(0, 11, (2, 3, 4), device=d)
    out = cpo_fast.token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(out, reference.token_logprobs(logits, labels))
    empty = cpo_fast.token_logprobs(torch.randn(0, 5, device=d), torch.zeros(0, dtype=torch.long, device=d),
                                    backend=backend)
    assert empty.shape == (0,)


@needs_fused
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


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
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


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake tensors and autograd registration agree."""
    d = dev(backend)
    logits = torch.randn(2, 3, 13, device=d, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3), device=d)
    from cpo_fast.ops.token_logprobs import _fwd_op

    torch.library.opcheck(_fwd_op, (logits, labels, -100, True, backend, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- the C++ CPU backend ------------------------------------------------------------------

def make_cpu_logits(B, T, V, dtype, scale, n_neg_inf, layout, labels, seed):
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
def cpu_cases(draw):
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


def logits_scale(x64: torch.Tensor) -> float:
    fin = x64[torch.isfinite(x64)]
    return max(1.0, float(fin.abs().max())) if fin.numel() else 1.0


@needs_cpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cpu_cases())
def test_cpu_matches_reference_on_each_isa(isa, case):
    B, T, V, dtype, scale, ignore, n_neg_inf, layout, with_entropy, grad_ent, inplace, seed = case
    labels = draw_labels(B, T, V, ignore, seed)
    x, x64 = make_cpu_logits(B, T, V, dtype, scale, n_neg_inf, layout, labels, seed)
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


@needs_cpu
def test_cpu_neg_inf_entropy_and_grad_are_finite():
    x = torch.tensor([[[0.5, float("-inf"), 2.0, float("-inf"), -1.0]]])
    labels = torch.tensor([[2]])
    leaf = x.clone().requires_grad_(True)
    lp, H = cpo_fast.token_logprobs(leaf, labels, with_entropy=True, backend="cpu")
    (lp.sum() + H.sum()).backward()
    rlp, rH = reference.token_logprobs(x.double(), labels, with_entropy=True)
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[..., [1, 3]] == 0).all()
    torch.testing.assert_close(lp.double(), rlp)
    torch.testing.assert_close(H.double(), rH)


@needs_cpu
def test_cpu_large_logits_entropy_no_cancellation():
    # Shifting every logit by 1e4 changes neither logp nor H (computed relative to the max).
    torch.manual_seed(0)
    x = torch.randn(4, 3000)
    labels = torch.randint(0, 3000, (4,))
    lp0, H0 = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend="cpu")
    lp1, H1 = cpo_fast.token_logprobs(x + 1e4, labels, with_entropy=True, backend="cpu")
    torch.testing.assert_close(H1, H0, atol=2e-5, rtol=0)
    torch.testing.assert_close(lp1, lp0, atol=2e-3, rtol=0)  # z_y and lse round at 1e4


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_later_chunks_above_the_running_max(dtype):
    """Rows whose later 1024-element chunks rise above the max seen so far, by 0 to 100:
    those chunks are summed in one sweep relative to the old max and rescaled (rises up to
    30), or redone max first (larger rises); both must match float64, NaN in a later chunk
    must still reach its row."""
    g = torch.Generator().manual_seed(0)
    rises = [0.0, 0.5, 5.0, 29.0, 30.5, 60.0, 100.0]
    x = torch.randn(len(rises), 4100, generator=g)
    for r, rise in enumerate(rises):
        x[r, 1024 + 1500 * (r % 2):] += rise  # a step at a chunk's start or in its middle
    x = x.to(dtype)
    labels = torch.randint(0, 4100, (len(rises),), generator=g)
    lp, H = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend="cpu")
    rlp, rH = reference.token_logprobs(x.double(), labels, with_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, atol=8 * EPS32 * 110 + 1e-5, rtol=1e-5)
    torch.testing.assert_close(H.double(), rH, atol=2e-5, rtol=2e-5)
    x[2, 3000] = float("nan")
    assert torch.isnan(cpo_fast.token_logprobs(x, labels, backend="cpu")[2])


@needs_cpu
def test_cpu_nan_logits_propagate():
    x = torch.randn(2, 50)
    x[0, 7] = float("nan")
    lp = cpo_fast.token_logprobs(x, torch.tensor([3, 4]), backend="cpu")
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1])


@needs_cpu
def test_cpu_inplace_gradient_lives_in_the_logits_buffer():
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


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_thread_count_independence(dtype):
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


@needs_cpu
def test_cpu_backend_errors_are_clear():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(TypeError, match="float64"):
        cpu_tok.token_logprobs_forward(x, labels, IGNORE_INDEX, False)
    with pytest.raises(ValueError, match="labels"):
        cpu_tok.token_logprobs_forward(x.float(), labels[:5], IGNORE_INDEX, False)
    with pytest.raises(ValueError, match="labels"):
        cpu_tok.token_logprobs_forward(x.float(), labels.int(), IGNORE_INDEX, False)


@needs_cpu
def test_cpu_out_of_range_label_never_read_out_of_bounds():
    # validate=False skips the Python check; the kernel must not read past the row.
    x = torch.randn(2, 10)
    lp = cpo_fast.token_logprobs(x, torch.tensor([3, 10_000_000]), backend="cpu",
                                 validate=False)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1])


# ---- head transforms (every backend) -------------------------------------------------------

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
def logits_cases(draw):
    return dict(
        B=draw(st.integers(1, 3)), T=draw(st.integers(1, 4)),
        V=draw(st.sampled_from([1, 2, 7, 33, 97, 129])),
        dtype=draw(st.sampled_from(DTYPES)), mag=draw(st.sampled_from([1.0, 10.0, 100.0])),
        ignore=draw(st.sampled_from(["none", "some", "all"])), n_neg_inf=draw(st.integers(0, 3)),
        shifted=draw(st.booleans()), with_entropy=draw(st.booleans()), tf=draw(transforms()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_transform_logits(c: dict, dev: str):
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
    logits, labels = make_transform_logits(c, dev(backend))
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


# ---- non-finite logits, output dtype (every backend) ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_is_float32_except_float64(backend):
    labels = torch.tensor([[1, 2, IGNORE_INDEX]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lp = cpo_fast.token_logprobs(torch.randn(1, 3, 5).to(dtype), labels, backend=backend)
        assert lp.dtype == torch.float32
    lp64 = cpo_fast.token_logprobs(torch.randn(1, 3, 5, dtype=torch.float64), labels,
                                   backend=backend)
    assert lp64.dtype == torch.float64  # float64 runs on the reference (gradcheck)
    assert "float64 for float64 logits" in " ".join(cpo_fast.token_logprobs.__doc__.split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_warn_naming_the_rows(backend):
    x = torch.randn(2, 3, 11)
    x[1, 2, 4] = math.nan
    x[0, 1, 7] = math.inf
    labels = torch.randint(0, 11, (2, 3))
    labels[0, 0] = IGNORE_INDEX
    with pytest.warns(RuntimeWarning, match=r"rows .*\[\(0, 1\), \(1, 2\)\]"):
        lp, ent = cpo_fast.token_logprobs(x, labels, with_entropy=True, backend=backend)
    assert torch.isfinite(lp[0, 2]) and torch.isfinite(ent[1, 0])
    with warnings.catch_warnings():
        # (only ours: the Triton interpreter's numpy warns about inf - inf on its own)
        warnings.filterwarnings("error", message="cpo_fast")
        cpo_fast.token_logprobs(x, labels, backend=backend, validate=False)  # opt-out
        x[1, 2, 4] = x[0, 1, 7] = 0.0
        cpo_fast.token_logprobs(x, labels, backend=backend)  # finite: silent


# ---- hypothesis-drawn adversarial inputs (CI size; the long run is tests/test_fuzz.py) -------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FUZZ_DTYPES)
@settings(max_examples=15, **FUZZ_SETTINGS)
@given(data=st.data())
def test_token_logprobs_adversarial(backend, dtype, data):
    check_token_case(data.draw(token_cases(FUZZ_DTYPES[dtype])), backend)
