"""Adversarial cases for the ops and the objectives, and the property each must satisfy.

Shared by the CI-sized runs (modest example counts: the ``*_adversarial`` tests of
tests/ops/test_token_logprobs.py, tests/ops/test_linear_token_logprobs.py and
tests/test_estimators.py) and the long run (tests/test_fuzz.py: 10,000 drawn cases per op
per dtype, enabled with CPO_FAST_FUZZ_LONG=1, result in benchmarks/results/fuzz-ops.md).

The property: a call gives either a correct result or a clear error, never a silent NaN.
  * bad input (an out-of-range label, an empty set for an objective, a NaN/inf where the
    objective needs a finite number) raises ValueError/TypeError with a message;
  * an op's row is either finite and equal to the float64 reference on the same (rounded)
    inputs within floating-point error, or non-finite with a cpo_fast RuntimeWarning emitted
    by that call (NaN/inf logits); ignored rows are exactly 0 with a zero gradient;
  * an objective's loss, value and diagnostics are finite (and match the reference in
    float64), and so is its gradient.
Each check returns the outcome's category ("ok", "warned", "error") for the tallies.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

import cpo_fast
from cpo_fast import reference
from cpo_fast.constants import IGNORE_INDEX, WEIGHTINGS

EPS32 = 2.0**-23
STORE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11,
             torch.float64: 1e-12}
SPECIALS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 6e4, -6e4, 0.0, 1e-30]
SCALES = [1.0, 1e-30, 30.0, 1e4, 1e30]
IGNORE_MODES = ["none", "some", "all", "alternate", "first", "last", "bad_label"]
TALLY: Counter = Counter()
# The dtypes every run draws for, and the CI-sized runs' hypothesis settings.
FUZZ_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))


# ---- drawing -------------------------------------------------------------------------------

def _values(draw, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float64 values: normal * a drawn scale, then specials at drawn flat positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from(SCALES))
    n = x.numel()
    if n:
        mode = draw(st.sampled_from(["clean", "clean", "specials", "all_special"]))
        flat = x.view(-1)
        if mode == "specials":
            for _ in range(draw(st.integers(1, 3))):
                flat[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
        elif mode == "all_special":
            flat[:] = draw(st.sampled_from(SPECIALS))
    return x


def _labels(draw, shape: tuple[int, ...], V: int, seed: int) -> tuple[torch.Tensor, bool]:
    """Labels in [0, V) with a drawn ignore pattern; ``bad`` when one is out of range."""
    g = torch.Generator().manual_seed(seed + 1)
    lab = torch.randint(0, V, shape, generator=g)
    flat = lab.view(-1)
    mode = draw(st.sampled_from(IGNORE_MODES))
    bad = False
    if flat.numel():
        if mode == "some":
            flat[torch.rand(flat.shape, generator=g) < 0.4] = IGNORE_INDEX
        elif mode == "all":
            flat[:] = IGNORE_INDEX
        elif mode == "alternate":
            flat[::2] = IGNORE_INDEX
        elif mode == "first":
            flat[0] = IGNORE_INDEX
        elif mode == "last":
            flat[-1] = IGNORE_INDEX
        elif mode == "bad_label":
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([V, -1, 10**6]))
            bad = True
    return lab, bad


@st.composite
def token_cases(draw, dtype: torch.dtype):
    B, T = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    V = draw(st.sampled_from([1, 2, 7, 33, 130]))
    seed = draw(st.integers(0, 2**31 - 1))
    shifted = draw(st.booleans())  # HF's logits[:, :-1]: a non-contiguous view
    x64 = _values(draw, (B, T + int(shifted), V), seed)
    x = x64.to(dtype)[:, :T] if shifted else x64.to(dtype)
    labels, bad = _labels(draw, (B, T), V, seed)
    return dict(x=x, labels=labels, bad=bad, with_entropy=draw(st.booleans()), seed=seed)


@st.composite
def linear_cases(draw, dtype: torch.dtype):
    N, d = draw(st.integers(0, 5)), draw(st.sampled_from([1, 3, 8]))
    V = draw(st.sampled_from([1, 2, 9, 40]))
    seed = draw(st.integers(0, 2**31 - 1))
    h = _values(draw, (N, d), seed).to(dtype)
    w = (_values(draw, (V, d), seed + 7) / math.sqrt(d)).to(dtype)
    b = _values(draw, (V,), seed + 9).to(dtype) if draw(st.booleans()) else None
    labels, bad = _labels(draw, (N,), V, seed)
    return dict(h=h, w=w, b=b, labels=labels, bad=bad, with_entropy=draw(st.booleans()),
                train_weight=draw(st.booleans()), seed=seed)


@st.composite
def objective_cases(draw, dtype: torch.dtype):
    kind = draw(st.sampled_from(["cpo", "dr", "dr_dm", "oo"]))
    n, m = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    v = lambda k, s: _values(draw, (k,), seed + s).to(dtype)
    return dict(kind=kind, s=v(n, 1), ref=v(n, 2), y=v(n, 3), ghat=v(n, 4), s_dm=v(m, 5),
                ref_dm=v(m, 6), ghat_dm=v(m, 7), weighting=draw(st.sampled_from(WEIGHTINGS)),
                higher_is_better=draw(st.booleans()), seed=seed)


# ---- checking ------------------------------------------------------------------------------

def _ours(rec) -> bool:
    return any(issubclass(w.category, RuntimeWarning) and str(w.message).startswith("cpo_fast")
               for w in rec)


def _call(fn, bad_input: bool):
    """(result or None, warned) — a clear error is returned as None; bad input must raise."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = fn()
        except (ValueError, TypeError) as e:
            assert str(e), "an error without a message"
            return None, _ours(rec), e
    assert not bad_input, "bad input (an out-of-range label) did not raise"
    return out, _ours(rec), None


def _check_rows(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor, atol: torch.Tensor,
                warned: bool, what: str) -> bool:
    """Rows: ignored exactly 0; finite ones match; non-finite ones only with a warning."""
    got = got.detach().double()
    assert (got[~valid] == 0).all(), f"{what}: an ignored row is not 0"
    fin = torch.isfinite(got) & valid
    nonfinite = valid & ~torch.isfinite(got)
    if bool(nonfinite.any()):
        assert warned, f"{what}: silent non-finite rows {nonfinite.nonzero().tolist()}"
    ok_ref = torch.isfinite(want)
    assert bool((ok_ref | ~fin).all()), f"{what}: finite where the reference is not"
    err = (got - want).abs()
    assert bool((err[fin] <= atol[fin]).all()), (
        f"{what}: max error {float(err[fin].max())} > tolerance {atol[fin].tolist()}")
    return bool(nonfinite.any())


def _row_scale(z64: torch.Tensor) -> torch.Tensor:
    finite = torch.where(torch.isfinite(z64), z64.abs(), torch.zeros((), dtype=z64.dtype))
    return finite.amax(-1).clamp_min(1.0) if z64.shape[-1] else torch.ones(z64.shape[:-1])


def check_token_case(c: dict, backend: str) -> str:
    x, labels, ent = c["x"], c["labels"], c["with_entropy"]
    leaf = x.detach().clone().requires_grad_(True)
    out, warned, err = _call(lambda: cpo_fast.token_logprobs(
        leaf, labels, with_entropy=ent, backend=backend), c["bad"])
    if out is None:
        return "error"
    lp, H = out if ent else (out, None)
    assert lp.shape == labels.shape
    assert lp.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    x64 = x.detach().double()
    rlp, rH = reference.token_logprobs(x64, labels, with_entropy=True)
    valid = labels != IGNORE_INDEX
    S = _row_scale(x64)
    tol = 1e-4 + 64 * EPS32 * S if x.dtype != torch.float64 else 1e-9 * S
    bad = _check_rows(lp, rlp, valid, tol, warned, "logp")
    if H is not None:
        bad |= _check_rows(H, rH, valid, tol + 1e-3, warned, "entropy")
    if lp.numel() and not bad:
        g = torch.Generator().manual_seed(c["seed"] + 3)
        G = torch.randn(lp.shape, generator=g, dtype=lp.dtype)
        (lp * G).sum().backward()
        want = reference.token_logprobs_grad(x64, labels, G.double())
        gtol = (64 * EPS32 * S + 2 * STORE_TOL[x.dtype] + 1e-6).unsqueeze(-1) * G.double(
        ).abs().unsqueeze(-1).clamp_min(1e-3)
        got = leaf.grad.double()
        assert (got[~valid] == 0).all(), "an ignored row got a gradient"
        fin_rows = torch.isfinite(want).all(-1) & valid
        d = (got - want).abs()[fin_rows]
        assert bool((d <= gtol.expand_as(got)[fin_rows]).all()), (
            f"logits gradient off by {float(d.max())}")
    return "warned" if bad else "ok"


def check_linear_case(c: dict, backend: str) -> str:
    h0, w0, b0, labels, ent = c["h"], c["w"], c["b"], c["labels"], c["with_entropy"]
    h = h0.detach().clone().requires_grad_(True)
    w = w0.detach().clone().requires_grad_(c["train_weight"])
    out, warned, err = _call(lambda: cpo_fast.linear_token_logprobs(
        h, w, labels, bias=b0, with_entropy=ent, backend=backend), c["bad"])
    if out is None:
        return "error"
    lp, H = out if ent else (out, None)
    h64, w64 = h0.double(), w0.double()
    b64 = b0.double() if b0 is not None else None
    rlp, rH = reference.linear_token_logprobs(h64, w64, labels, bias=b64, with_entropy=True)
    valid = labels != IGNORE_INDEX
    z_abs = h64.abs().nan_to_num(0, 0, 0) @ w64.abs().nan_to_num(0, 0, 0).T
    if b64 is not None:
        z_abs = z_abs + b64.abs().nan_to_num(0, 0, 0)
    S = z_abs.amax(-1).clamp_min(1.0) if z_abs.shape[-1] else torch.ones(labels.shape)
    d = h0.shape[-1]
    tol = (1e-4 + 16 * (d + 8) * EPS32 * S) if h0.dtype != torch.float64 else 1e-9 * S
    bad = _check_rows(lp, rlp, valid, tol, warned, "logp")
    if H is not None:
        bad |= _check_rows(H, rH, valid, tol + 1e-3, warned, "entropy")
    # An infinite entry in hidden or weight makes the gradient undefined (0 * inf where a
    # logit is -inf), documented on the op: the forward is still checked, not the gradient.
    inf_param = bool(torch.isinf(h0).any() or torch.isinf(w0).any())
    # Logits above ~2^20 in float32: lse = m + log s rounds to m (spacing > log s), so the
    # backward's p = exp(z - lse) no longer sums to 1 and a half-precision gradient can
    # overflow. A known float32 limit of the saved-lse design (all backends), not checked.
    huge = bool((S > 2.0**20).any()) and h0.dtype != torch.float64
    if lp.numel() and not bad and lp.requires_grad and not inf_param and not huge:
        g = torch.Generator().manual_seed(c["seed"] + 3)
        G = torch.randn(lp.shape, generator=g, dtype=lp.dtype)
        (lp * G).sum().backward()
        got = h.grad.double()
        # |dL/dh| <= 2 |G| max|W|: past the dtype's range an inf is the correct rounding
        bound = 2 * G.double().abs() * float(w64.abs().max())
        fits = bound < torch.finfo(h0.dtype).max
        assert bool(torch.isfinite(got[valid & fits]).all()), (
            "non-finite hidden gradient, finite output")
        assert (got[~valid] == 0).all(), "an ignored row got a gradient"
    return "warned" if bad else "ok"


def _objective_call(c: dict, s: torch.Tensor, s_dm: torch.Tensor, mod=cpo_fast):
    kw = dict(weighting=c["weighting"], higher_is_better=c["higher_is_better"])
    if c["kind"] == "cpo":
        return mod.cpo_loss(s, c["ref"], c["y"], **kw)
    if c["kind"] == "dr":
        return mod.dr_cpo_loss(s, c["ref"], c["y"], c["ghat"], **kw)
    if c["kind"] == "oo":
        return mod.oo_rlhf_loss(s_dm, c["ref_dm"], c["ghat_dm"], **kw)
    return mod.dr_cpo_loss(s, c["ref"], c["y"], c["ghat"], dm_policy_logp=s_dm,
                           dm_ref_logp=c["ref_dm"], dm_outcome_pred=c["ghat_dm"], **kw)


def check_objective_case(c: dict) -> str:
    s = c["s"].detach().clone().requires_grad_(True)
    s_dm = c["s_dm"].detach().clone().requires_grad_(True)
    used = {"cpo": ("s", "ref", "y"), "dr": ("s", "ref", "y", "ghat"),
            "oo": ("s_dm", "ref_dm", "ghat_dm")}.get(c["kind"], tuple(k for k in c if k in (
                "s", "ref", "y", "ghat", "s_dm", "ref_dm", "ghat_dm")))
    must_raise = any(c[k].numel() == 0 or not bool(torch.isfinite(c[k]).all()) for k in used)
    out, _, err = _call(lambda: _objective_call(c, s, s_dm), False)
    if out is None:
        return "error"
    assert not must_raise, "a non-finite or empty input did not raise"
    for name in ("loss", "value", "ess", "max_weight_share", "dm_ess"):
        t = getattr(out, name)
        assert t is None or bool(torch.isfinite(t)), f"{name} = {t} (silent non-finite)"
    grads = torch.autograd.grad(out.loss, [s, s_dm], allow_unused=True, materialize_grads=True)
    assert all(bool(torch.isfinite(g).all()) for g in grads), "non-finite gradient"
    if s.dtype == torch.float64:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _objective_call(c, s.detach(), s_dm.detach(), reference)
        scale = max(1.0, float(ref.loss.abs()))
        assert abs(float(out.loss) - float(ref.loss)) <= 1e-9 * scale, (out.loss, ref.loss)
        torch.testing.assert_close(out.ess.double(), ref.ess, rtol=1e-6, atol=1e-9)
    return "ok"
