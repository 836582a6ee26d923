r"""Fused logits path: per-token log-probabilities (and entropy) from a logits tensor.

Math (docs/math.md). For a row of logits :math:`z \in \mathbb{R}^V` and its
label :math:`y`, with :math:`\mathrm{lse} = \log\sum_v e^{z_v}` and :math:`p = \mathrm{softmax}(z)`:

    logp = z[y] - lse
    H    = lse - sum_v p_v z_v                       (entropy, optional)

Backward, from G = dL/dlogp and E = dL/dH:

    dL/dz_v = G ([v == y] - p_v) - E p_v (log p_v + H)

Head transforms (``temperature``, ``softcap``, ``logit_scale``; docs/math.md): the row is
first replaced by z', in the order of Hugging Face models and TRL,

    u_v  = logit_scale z_v,     z'_v = (softcap tanh(u_v / softcap) if softcap else u_v) / temperature

and everything above is computed from z' (logp, H and lse are those of softmax(z')); the
gradient with respect to the raw logits is

    dL/dz_v = dL/dz'_v (logit_scale / temperature) (1 - tanh(u_v / softcap)^2 if softcap else 1)

A -inf logit becomes -softcap / temperature under a softcap (torch.tanh(-inf) = -1, as in
HF models) and gets a zero gradient. The defaults (the identity) run the untransformed
kernels, unchanged.

The forward reads each row once and saves ``lse`` (and ``H``); the backward reads the row
once more and writes its gradient, optionally over the logits buffer itself
(``inplace_backward=True``). Rows whose label is ``ignore_index`` give logp = H = 0 and a
zero gradient. Any row strides are accepted, so HF's ``logits[:, :-1, :]`` needs no copy.

Backends: ``cpo_fast.kernels.token_logprobs`` (Triton), ``cpo_fast.cpu.token_logprobs``
(C++ core) and ``cpo_fast.reference.token_logprobs``; their contract, the dispatch and the
float64 reroute are written once in ``cpo_fast/_backend.py``. This module holds the autograd
op: the ``torch.library`` custom ops (the only place where a missing tensor is an empty
tensor rather than None) and the public wrapper, which validates the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpo_fast import reference
from cpo_fast._backend import backend_module, optional, select_backend
from cpo_fast._checks import check_float, check_head_transform, check_labels, warn_nonfinite_rows
from cpo_fast._transform import HeadTransform, from_schema, schema_scalars
from cpo_fast.constants import IGNORE_INDEX


def _impl(backend: str):
    return backend_module(backend, "token_logprobs")


def _as_3d(logits: Tensor) -> Tensor:
    """[..., V] -> [B, T, V] without a copy when the leading dims allow it."""
    V = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, V)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    T = logits.shape[-2]
    try:
        return logits.view(-1, T, V)
    except RuntimeError:  # leading dims not mergeable: one copy
        return logits.reshape(-1, T, V)


@torch.library.custom_op("cpo_fast::token_logprobs_fwd", mutates_args=())
def _fwd_op(
    logits: Tensor, labels: Tensor, ignore_index: int, with_entropy: bool, backend: str,
    inplace_backward: bool, temperature: float = 1.0, softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    # inplace_backward only matters to the backward; it is an argument so that
    # setup_context sees it (also under torch.compile).
    logp, ent, lse = _impl(backend).token_logprobs_forward(
        _as_3d(logits), labels.reshape(-1).long().contiguous(), ignore_index, with_entropy,
        transform=from_schema(temperature, softcap, logit_scale),
    )
    ent = optional(ent)
    ent = ent.view(labels.shape) if with_entropy else logp.new_empty(0)
    return logp.view(labels.shape), ent, lse.view(labels.shape)


@_fwd_op.register_fake
def _(logits, labels, ignore_index, with_entropy, backend, inplace_backward, temperature=1.0,
      softcap=None, logit_scale=1.0):
    f = lambda: logits.new_empty(labels.shape, dtype=torch.float32)
    return f(), f() if with_entropy else logits.new_empty(0, dtype=torch.float32), f()


@torch.library.custom_op("cpo_fast::token_logprobs_bwd", mutates_args=())
def _bwd_op(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Tensor | None, ignore_index: int, backend: str, temperature: float = 1.0,
    softcap: float | None = None, logit_scale: float = 1.0,
) -> Tensor:
    # A backend may supply the buffer (the CPU one reuses large buffers: no page faults).
    new = getattr(_impl(backend), "new_grad_buffer", None)
    out = new(logits) if new is not None else torch.empty(
        logits.shape, dtype=logits.dtype, device=logits.device)
    _run_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, backend, out,
             temperature, softcap, logit_scale)
    return out


@_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, backend,
      temperature=1.0, softcap=None, logit_scale=1.0):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("cpo_fast::token_logprobs_bwd_", mutates_args=("logits",))
def _bwd_inplace_op(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Tensor | None, ignore_index: int, backend: str, temperature: float = 1.0,
    softcap: float | None = None, logit_scale: float = 1.0,
) -> None:
    _run_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, backend, logits,
             temperature, softcap, logit_scale)


def _run_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, backend, out,
             temperature, softcap, logit_scale):
    flat = lambda t: None if optional(t) is None else t.reshape(-1).float().contiguous()
    _impl(backend).token_logprobs_backward(
        _as_3d(logits), labels.reshape(-1).long().contiguous(), flat(lse), flat(entropy),
        flat(grad_logp), flat(grad_entropy), ignore_index, _as_3d(out),
        transform=from_schema(temperature, softcap, logit_scale),
    )


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, with_entropy, backend, inplace, *head = inputs
    logp, ent, lse = output
    ctx.save_for_backward(logits, labels, lse, ent)
    ctx.args = (ignore_index, with_entropy, backend, inplace, tuple(head))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_ent, _grad_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    ignore_index, with_entropy, backend, inplace, head = ctx.args
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not with_entropy:
        grad_ent = None
    args = (labels, lse, ent, grad_logp, grad_ent, ignore_index, backend, *head)
    nones = (None,) * (5 + len(head))
    if inplace:
        _bwd_inplace_op(logits, *args)
        return (logits, *nones)
    return (_bwd_op(logits, *args), *nones)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    with_entropy: bool = False,
    backend: str | None = None,
    inplace_backward: bool = False,
    validate: bool = True,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    transform: HeadTransform | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities ``log softmax(z')[labels]`` (and entropies) of the
    transformed logits ``z' = (softcap tanh(logit_scale z / softcap) or logit_scale z) /
    temperature`` (just the logits at the defaults).

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 on the reference path);
            any strides (a shifted view such as ``logits[:, :-1]`` is read without a copy).
        labels: integer tensor of shape ``logits.shape[:-1]``, already aligned with the rows
            (the caller shifts). Positions equal to ``ignore_index`` give 0 and no gradient.
        with_entropy: also return the per-token entropy ``H`` (differentiable).
        backend: ``"triton"``, ``"cpu"``, ``"reference"`` or None for the best available
            (environment variable ``CPO_FAST_BACKEND`` overrides the default).
        inplace_backward: write the gradient over the ``logits`` buffer during backward
            instead of allocating a new one (saves an N x V buffer). The logits' contents
            are destroyed by backward, so use it only when nothing else reads them.
        validate: check labels against ``[0, V)`` up front, and warn (RuntimeWarning, naming
            the rows) when a returned value is NaN or infinite on a row that is not ignored,
            i.e. NaN/inf logits (two device syncs, O(N): the N x V logits are not read
            again). The kernels never read out of bounds either way.
        temperature: divide the (scaled, capped) logits by this, as sampling at that
            temperature does (TRL's ``temperature``); finite, > 0.
        softcap: None, or cap the scaled logits to ``(-softcap, softcap)`` with
            ``softcap * tanh(u / softcap)`` (Gemma-2's ``final_logit_softcapping``); finite,
            > 0. Under a softcap a ``-inf`` logit becomes ``-softcap / temperature``, as in
            HF models, with a zero gradient.
        logit_scale: multiply the logits by this first (Cohere's ``logit_scale``); finite.
            The gradient is taken with respect to the raw logits: the transform's derivative
            ``(logit_scale / temperature) (1 - tanh(u / softcap)^2)`` is applied in the
            backward (see the module docstring).
        transform: the same three numbers as one ``HeadTransform`` (e.g.
            ``HeadTransform.from_model(model)``), instead of the keywords above.

    Returns:
        ``logp`` shaped like ``labels``; or ``(logp, entropy)`` with ``with_entropy``. The
        dtype is float32 for float32 / bfloat16 / float16 logits (the kernels accumulate in
        float32) and float64 for float64 logits (which run on the reference path, so that
        gradcheck works).
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}.")
    V = logits.shape[-1]
    tf = check_head_transform(HeadTransform.of(transform, temperature, softcap, logit_scale))
    check_labels(labels, logits.shape[:-1], V, ignore_index, validate=validate)
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}.")
    name = select_backend(backend, logits.device, logits.dtype)
    if name == "reference" or logits.numel() == 0:
        out = reference.token_logprobs(logits, labels, ignore_index=ignore_index,
                                       with_entropy=with_entropy, transform=tf)
    else:
        # The custom-op schema carries scalars only: the transform is unpacked here and
        # rebuilt inside the op (from_schema; the identity reaches the backend as None).
        logp, ent, _ = _fwd_op(logits, labels, ignore_index, with_entropy, name,
                               inplace_backward, *schema_scalars(tf))
        out = (logp, ent) if with_entropy else logp
    if validate:
        warn_nonfinite_rows("token_logprobs", "logits", labels, ignore_index,
                            *(out if with_entropy else (out,)))
    return out
