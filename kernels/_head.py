r"""Head transforms inside the Triton kernels (shared by both ops' kernels).

The transform of each raw logit z (cpo_fast._transform.HeadTransform), from three run-time
scalars ``(pre, post, grad)`` that :func:`head_args` derives from it at the launch:

    softcap:    t = tanh(pre z),  z' = post t,   dz = dz' grad (1 - t^2)
    otherwise:  z' = pre z,                      dz = dz' pre

tanh is formed from one exp that cannot overflow, e = exp(-2|x|) in [0, 1]:
tanh|x| = (1 - e) / (1 + e) and 1 - tanh^2 = 4 e / (1 + e)^2 (no cancellation near |t| = 1);
x = -inf gives t = -1 and a zero factor, as torch.tanh does. Plain tl.exp: the same code
runs under the interpreter and on the GPU. The kernels call these only under their
``HAS_TRANSFORM`` constexpr, so the default build has none of it.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from cpo_fast._transform import HeadTransform, active


def head_args(transform: HeadTransform | None, *, with_grad: bool) -> dict[str, Any]:
    """A kernel launch's head-transform arguments: the constexprs ``HAS_TRANSFORM`` /
    ``HAS_SOFTCAP`` and the scalars ``tf_pre``, ``tf_post`` (and ``tf_grad`` for a backward
    kernel) of the formulas above; flags off (scalars 1) for None or the identity. With a
    softcap ``pre = logit_scale / softcap``, ``post = softcap / temperature``, ``grad =
    logit_scale / temperature``; without one all three are ``logit_scale / temperature``."""
    tf = active(transform)
    pre = post = grad = 1.0 if tf is None else tf.grad_scale
    capped = tf is not None and tf.softcap is not None
    if capped:
        pre = float(tf.logit_scale) / float(tf.softcap)
        post = float(tf.softcap) / float(tf.temperature)
    out: dict[str, Any] = dict(tf_pre=pre, tf_post=post, HAS_TRANSFORM=tf is not None,
                               HAS_SOFTCAP=capped)
    if with_grad:
        out["tf_grad"] = grad
    return out


@triton.jit
def _head_apply(z, pre, post, HAS_SOFTCAP: tl.constexpr):
    """z' of the raw fp32 logits z."""
    if HAS_SOFTCAP:
        x = z * pre
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        out = post * tl.where(x < 0, -t, t)
    else:
        out = z * pre
    return out


@triton.jit
def _head_apply_grad(z, pre, post, grad, HAS_SOFTCAP: tl.constexpr):
    """(z', dz'/dz) of the raw fp32 logits z."""
    if HAS_SOFTCAP:
        x = z * pre
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        out = post * tl.where(x < 0, -t, t)
        one_e = 1.0 + e
        factor = grad * (4.0 * e / (one_e * one_e))
    else:
        out = z * pre
        factor = tl.zeros_like(z) + pre
    return out, factor
