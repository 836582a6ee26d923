"""The head transform (cpo_fast/_transform.py: ``HeadTransform``) from the public ops to the
backends: its arguments validated naming each one, read from model configs, the identity
reaching every backend as None, and the transform's scalars through both ops' custom-op
schema (torch.compile, opcheck). The numerics of each op under a transform are in
tests/ops/.

    u = logit_scale z,   z' = (softcap tanh(u / softcap) if softcap else u) / temperature

(Hugging Face / TRL order).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import dev, kernel_backends

import cpo_fast
from cpo_fast._transform import HeadTransform

FUSED = kernel_backends()


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


def test_config_fields_read():
    assert HeadTransform.from_model(tf.FalconH1Config(lm_head_multiplier=0.5)).logit_scale == 0.5
    mpt = tf.MptConfig(d_model=64, logit_scale="inv_sqrt_d_model")
    assert HeadTransform.from_model(mpt).logit_scale == pytest.approx(1 / 8)
    assert HeadTransform.from_model(tf.LlamaConfig()).is_identity


def test_unsupported_head_field_is_named():
    cfg = tf.LlamaConfig()
    cfg.mup_width_multiplier = 8.0
    with pytest.raises(NotImplementedError, match="mup_width_multiplier"):
        HeadTransform.from_model(cfg)


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
