r"""Fused-linear path: per-token log-probabilities straight from hidden states and the
output weight, never materializing the N x V logits.

Math (docs/math.md). With hidden states ``h[N, d]``, output weight ``W[V, d]``,
optional bias ``b[V]``, logits ``z_t = W h_t + b`` (computed tile by tile, never stored):

    logp_t = z_t[y_t] - lse(z_t),   H_t = lse(z_t) - sum_v p_tv z_tv
    dL/dz_tv   = G_t ([v == y_t] - p_tv) - E_t p_tv (log p_tv + H_t)
    dL/dh_t    = sum_v dL/dz_tv W[v]
    dL/dW[v]   = sum_t dL/dz_tv h_t,     dL/db[v] = sum_t dL/dz_tv

Head transforms (``temperature``, ``softcap``, ``logit_scale``; docs/math.md): each logit
is transformed before the softmax, ``z'_tv = (softcap tanh(u_tv / softcap) if softcap else
u_tv) / temperature`` with ``u_tv = logit_scale z_tv``; logp, H and lse are those of z', and
dL/dz_tv = dL/dz'_tv (logit_scale / temperature) (1 - tanh(u_tv / softcap)^2 if softcap
else 1), after which dL/dh, dL/dW and dL/db are the sums above. The backends apply the
transform to each logits tile in place, so nothing N x V appears.

Forward stores O(N) values (logp, lse, H); backward recomputes the logits tiles
(2NdV FLOPs forward + 6NdV backward with a trained weight, vs 2NdV + 4NdV for eager).

Frozen-weight fast path (LoRA: ``lm_head`` frozen). When ``hidden`` needs a gradient but
``weight`` and ``bias`` do not, only dL/dh is wanted, and it needs the logits only through

    PW_t = sum_v p_tv W[v],    PLW_t = sum_v p_tv log p_tv W[v]   (PLW: entropy only)
    dL/dh_t = G_t (W[y_t] - PW_t) - E_t (PLW_t + H_t PW_t)        (ignored rows: 0)

(substitute dL/dz_tv into sum_v dL/dz_tv W[v]: sum_v [v == y_t] W[v] = W[y_t],
sum_v p_tv log p_tv W[v] = PLW_t). A backend that provides the optional
``linear_token_logprobs_forward_frozen`` accumulates PW (and PLW) in its forward, online
over vocabulary blocks like the logsumexp, and the backward is then O(N d) torch ops here
(no recompute, the backend backward is never called): 4NdV FLOPs in all without entropy,
as for eager with a frozen weight (6NdV with entropy: a second product per block for PLW,
the same count as recomputing, but no second pass over the logits); saved for backward:
PW and PLW, [N, d] float32 each. The path is chosen in :func:`linear_token_logprobs`,
where grad mode and ``requires_grad`` are visible (the custom op's forward runs without
grad mode), and carried into the op as its ``frozen`` flag. Under a head transform the
frozen path is exact for a pure scale (``temperature``, ``logit_scale``: p is the softmax of
z', and dz'/dz is the constant logit_scale / temperature, applied to dL/dh here) and is
skipped when a ``softcap`` is set (dz'/dz then varies per logit, which PW and PLW do not
carry): the recompute backward runs instead.

``grad_skip_threshold > 0`` lets a backend skip backward tiles whose largest softmax
probability (over the tile) is below the threshold and whose label and entropy terms are
absent (an approximation, off by default; see the backend's docstring for its error bound).

Backends: ``cpo_fast.kernels.linear_token_logprobs`` (Triton),
``cpo_fast.cpu.linear_token_logprobs`` (C++ core; it has the frozen-weight forward) and
``cpo_fast.reference.linear_token_logprobs``; their contract (including the optional
``linear_token_logprobs_forward_frozen``), the dispatch and the float64 reroute are written
once in ``cpo_fast/_backend.py``. This module holds the autograd op and the public wrapper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpo_fast import reference
from cpo_fast._backend import backend_module, optional, select_backend
from cpo_fast._checks import check_float, check_head_transform, check_labels, warn_nonfinite_rows
from cpo_fast._transform import HeadTransform, active, from_schema, schema_scalars
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.ops.linear_token_logprobs_known import KnownGrad


def _impl(backend: str):
    return backend_module(backend, "linear_token_logprobs")


# Called from the Python wrapper, which torch.compile traces: dynamo does not trace the
# dispatch table's lazy imports, so the answer (fixed per backend) is taken as a trace-time
# constant.
@torch.compiler.assume_constant_result
def _has_frozen_path(backend: str) -> bool:
    return hasattr(_impl(backend), "linear_token_logprobs_forward_frozen")


@torch.library.custom_op("cpo_fast::linear_token_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, ignore_index: int,
    with_entropy: bool, backend: str, grad_skip_threshold: float, frozen: bool,
    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy or [0], lse, pw or [0], plw or [0]); pw/plw only when ``frozen``."""
    # bias is an empty tensor when absent (custom ops take no Optional outputs/None mixing).
    # One fresh empty per unused output: custom-op outputs may not alias each other.
    empty = lambda: hidden.new_empty(0, dtype=torch.float32)
    impl = _impl(backend)
    tf = from_schema(temperature, softcap, logit_scale)
    if frozen:
        logp, ent, lse, pw, plw = impl.linear_token_logprobs_forward_frozen(
            hidden, weight, optional(bias), labels, ignore_index, with_entropy, transform=tf
        )
    else:
        logp, ent, lse = impl.linear_token_logprobs_forward(
            hidden, weight, optional(bias), labels, ignore_index, with_entropy, transform=tf
        )
        pw = plw = None
    or_empty = lambda t, wanted: t if wanted and optional(t) is not None else empty()
    return (logp, or_empty(ent, with_entropy), lse, or_empty(pw, frozen),
            or_empty(plw, frozen and with_entropy))


@_fwd_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, with_entropy, backend, grad_skip_threshold,
      frozen, temperature=1.0, softcap=None, logit_scale=1.0):
    f = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)
    N, d = hidden.shape
    return (f(N), f(N if with_entropy else 0), f(N), f(N, d) if frozen else f(0),
            f(N, d) if frozen and with_entropy else f(0))


@torch.library.custom_op("cpo_fast::linear_token_logprobs_bwd", mutates_args=())
def _bwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Tensor, grad_entropy: Tensor, ignore_index: int, needs_hidden_grad: bool,
    needs_weight_grad: bool, needs_bias_grad: bool, backend: str, grad_skip_threshold: float,
    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_entropy = optional(grad_entropy)
    gh, gw, gb = _impl(backend).linear_token_logprobs_backward(
        hidden, weight, optional(bias), labels, lse, optional(entropy),
        grad_logp.float().contiguous(),
        None if grad_entropy is None else grad_entropy.float().contiguous(),
        ignore_index, needs_hidden_grad, needs_weight_grad, needs_bias_grad,
        grad_skip_threshold, transform=from_schema(temperature, softcap, logit_scale),
    )
    # One fresh empty per missing output: custom-op outputs may not alias each other.
    empty = lambda: hidden.new_empty(0)
    return (gh if gh is not None else empty(), gw if gw is not None else empty(),
            gb if gb is not None else empty())


@_bwd_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, ignore_index,
      needs_hidden_grad, needs_weight_grad, needs_bias_grad, backend, grad_skip_threshold,
      temperature=1.0, softcap=None, logit_scale=1.0):
    e = hidden.new_empty(0)
    return (torch.empty_like(hidden) if needs_hidden_grad else e,
            torch.empty_like(weight) if needs_weight_grad else e,
            torch.empty_like(bias) if needs_bias_grad else e)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, with_entropy, backend, thr, frozen, *head = inputs
    logp, ent, lse, pw, plw = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent, pw, plw)
    ctx.args = (ignore_index, with_entropy, backend, thr, frozen, tuple(head))
    ctx.mark_non_differentiable(lse, pw, plw)


def _frozen_grad_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, ent: Tensor,
                        pw: Tensor, plw: Tensor, grad_logp: Tensor, grad_ent: Tensor | None,
                        ignore_index: int, scale: float = 1.0) -> Tensor:
    """dL/dh = scale (G (W[y] - PW) - E (PLW + H PW)), ignored rows 0: O(N d), no logits.

    ``scale`` is dz'/dz of a pure-scale head transform (logit_scale / temperature)."""
    valid = labels != ignore_index
    # ignored rows' labels may be any value (-100): gather a valid row, then mask
    wy = weight[torch.where(valid, labels, torch.zeros_like(labels))].float()
    gh = grad_logp.float()[:, None] * (wy - pw)
    if grad_ent is not None:
        gh = gh - grad_ent.float()[:, None] * (plw + ent[:, None] * pw)
    if scale != 1.0:
        gh = gh * scale
    # where, not a multiply: an upstream inf/NaN on an ignored row must not leak in
    return torch.where(valid[:, None], gh, torch.zeros((), dtype=gh.dtype)).to(hidden.dtype)


def _backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_pw, _grad_plw):
    hidden, weight, bias, labels, lse, ent, pw, plw = ctx.saved_tensors
    ignore_index, with_entropy, backend, thr, frozen, head = ctx.args
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not with_entropy or grad_ent is None:
        grad_ent = lse.new_empty(0)
    nh, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and bias.numel() > 0
    if frozen and not (nw or nb):  # always the case: frozen is chosen only then
        tf = from_schema(*head)  # frozen: no softcap here
        gh = _frozen_grad_hidden(hidden, weight, labels, ent, pw, plw, grad_logp,
                                 grad_ent if grad_ent.numel() > 0 else None, ignore_index,
                                 1.0 if tf is None else tf.grad_scale)
        return (gh if nh else None, *(None,) * (8 + len(head)))
    gh, gw, gb = _bwd_op(hidden, weight, bias, labels, lse, ent, grad_logp, grad_ent,
                         ignore_index, nh, nw, nb, backend, thr, *head)
    if nh:  # dz = 0 on ignored rows, but 0 * (a NaN in W) is NaN: they get 0, as documented
        gh = torch.where((labels != ignore_index)[:, None], gh, torch.zeros((), dtype=gh.dtype))
    return (gh if nh else None, gw if nw else None, gb if nb else None,
            *(None,) * (6 + len(head)))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    with_entropy: bool = False,
    backend: str | None = None,
    grad_skip_threshold: float = 0.0,
    validate: bool = True,
    transform: HeadTransform | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_coef: Tensor | None = None,
    grad_coef_entropy: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log softmax(z')[labels]`` without building logits, where ``z'`` is the
    head transform of ``z = hidden @ weight.T + bias``: ``z' = (softcap tanh(logit_scale z /
    softcap) or logit_scale z) / temperature`` (``z`` itself at the defaults).

    Args:
        hidden: ``[..., d]`` last hidden states (any float dtype; bf16/fp16 kernels
            accumulate in float32).
        weight: ``[V, d]`` output embedding (``lm_head.weight``; tied embeddings work).
            Frozen (``requires_grad=False``) weights get no gradient computed, and with a
            frozen weight (and bias) the backward needs no logits recompute when the
            backend supports it (the C++ CPU one does; see the module docstring). A weight of
            another dtype than ``hidden`` is cast to ``hidden.dtype`` first (as autocast does).
        labels: integer ``hidden.shape[:-1]``, aligned with the rows; ``ignore_index`` rows
            give 0 and no gradient.
        bias: optional ``[V]``. Mask tokens with a ``-inf`` bias entry, not with an infinite
            weight: ``hidden`` and ``weight`` must be finite (a NaN makes the rows it reaches
            NaN, with the warning below; an infinite entry makes the gradient undefined,
            0 * inf where a logit is -inf).
        grad_skip_threshold: skip backward vocabulary tiles whose softmax mass is below this
            (approximate; 0 disables).
        backend: as in :func:`cpo_fast.token_logprobs`.
        validate: as in :func:`cpo_fast.token_logprobs` (labels checked up front; a warning
            naming the rows whose result is NaN or infinite, i.e. NaN/inf in ``hidden``,
            ``weight`` or ``bias``).
        temperature, softcap, logit_scale: the head transform, as in
            :func:`cpo_fast.token_logprobs` (HF / TRL order: scale, cap, divide by the
            temperature); gradients are with respect to hidden, weight and bias through it
            (module docstring). A softcap turns off the frozen-weight fast path.
        transform: the three as one ``HeadTransform`` instead (what
            :func:`cpo_fast.causal_lm_token_logprobs` passes: ``HeadTransform.from_model``).
        grad_coef, grad_coef_entropy: ``dL/dlogp`` (and ``dL/dH``, with ``with_entropy``)
            of the loss you will backpropagate, shaped like ``labels``, when known before
            the forward (a loss linear in the log-probs). With a trained weight or bias the
            gradients are then formed in the forward, with no logits recompute (6NdV FLOPs
            instead of 8NdV; cpo_fast/ops/linear_token_logprobs_known.py); the backward
            checks the coefficients and recomputes, with a warning, if they were not the
            loss's. Ignored with a frozen head, without grad mode, and on the reference.

    Returns:
        ``logp`` shaped like ``labels``; or ``(logp, entropy)`` with ``with_entropy``:
        float32, or float64 when ``hidden`` is float64 (the reference path).

    Sharded heads: a ``DTensor`` weight or bias (FSDP2's ``fully_shard`` outside the head's
    own forward) is gathered with ``full_tensor()``, whose backward reduce-scatters the
    gradient back to the shards. ZeRO-3 heads: gather them first (``deepspeed.zero.
    GatheredParameters``), as TRL does.
    """
    weight, bias = _unshard(weight), _unshard(bias)
    _check_inputs(hidden, weight, labels, bias, ignore_index, grad_skip_threshold, validate)
    tf = check_head_transform(HeadTransform.of(transform, temperature, softcap, logit_scale))
    name = select_backend(backend, hidden.device, hidden.dtype)
    coefs = _check_coefs(grad_coef, grad_coef_entropy, labels, with_entropy)
    if name == "reference" or hidden.numel() == 0:
        out = reference.linear_token_logprobs(hidden, weight, labels, bias=bias,
                                              ignore_index=ignore_index,
                                              with_entropy=with_entropy, transform=tf)
    else:
        out = _fused(hidden, weight, labels, bias, ignore_index, with_entropy, name,
                     grad_skip_threshold, tf, coefs)
    if validate:
        warn_nonfinite_rows("linear_token_logprobs", "hidden @ weight.T + bias", labels,
                            ignore_index, *(out if with_entropy else (out,)))
    return out


def _unshard(t: Tensor | None) -> Tensor | None:
    """The full tensor of a DTensor parameter (differentiable all-gather); others as they are."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                  ignore_index: int, grad_skip_threshold: float, validate: bool) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, d], got shape {tuple(weight.shape)}.")
    V, d = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != d:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but its last dim must equal weight's "
            f"d = {d} (weight is [V, d] = {tuple(weight.shape)})."
        )
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}.")
    check_labels(labels, hidden.shape[:-1], V, ignore_index, what="hidden.shape[:-1]",
                 validate=validate)
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}.")
    if grad_skip_threshold < 0:
        raise ValueError(f"grad_skip_threshold must be >= 0, got {grad_skip_threshold}.")


def _check_coefs(coef: Tensor | None, coef_ent: Tensor | None, labels: Tensor,
                 with_entropy: bool) -> tuple[Tensor, Tensor | None] | None:
    """grad_coef (and grad_coef_entropy) flattened to float32 [N], or None when not given."""
    if coef is None:
        if coef_ent is not None:
            raise ValueError("grad_coef_entropy was given without grad_coef; pass both.")
        return None
    if coef_ent is not None and not with_entropy:
        raise ValueError("grad_coef_entropy needs with_entropy=True (the entropy it multiplies).")
    out = []
    for name, t in (("grad_coef", coef), ("grad_coef_entropy", coef_ent)):
        if t is not None and (t.shape != labels.shape or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor shaped like labels "
                             f"{tuple(labels.shape)}, got {t.dtype} {tuple(t.shape)}.")
        out.append(None if t is None else
                   t.detach().reshape(-1).to(labels.device, torch.float32).contiguous())
    return out[0], out[1]


def _fused(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
           ignore_index: int, with_entropy: bool, name: str, grad_skip_threshold: float,
           tf: HeadTransform, coefs: tuple[Tensor, Tensor | None] | None = None,
           ) -> Tensor | tuple[Tensor, Tensor]:
    """The custom op on a fused backend (inputs already validated)."""
    d = weight.shape[1]
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    shape = labels.shape
    flat_labels = labels.reshape(-1).long().contiguous()
    h2 = hidden.reshape(-1, d).contiguous()
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trained:
        # grad_W sums dz * h over rows, dz = 0 on ignored rows, but 0 * NaN is NaN: zero
        # their hidden states (O(N d), only when the weight is trained).
        h2 = torch.where((flat_labels != ignore_index)[:, None], h2,
                         torch.zeros((), dtype=h2.dtype))
    if coefs is not None and trained and torch.is_grad_enabled() and grad_skip_threshold == 0:
        logp, ent = KnownGrad.apply(h2, weight.contiguous(), None if bias is None else
                                    bias.contiguous(), flat_labels, *coefs, ignore_index,
                                    with_entropy, name, active(tf))
        return (logp.view(shape), ent.view(shape)) if with_entropy else logp.view(shape)
    b = bias.contiguous() if bias is not None else h2.new_empty(0)
    # The frozen-weight fast path is decided here: the custom op's forward runs with grad
    # mode off and cannot see who will need a gradient.
    frozen = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
              and (bias is None or not bias.requires_grad) and tf.softcap is None
              and _has_frozen_path(name))
    # The custom-op schema carries scalars only: the transform is unpacked here and rebuilt
    # inside the op (from_schema; the identity reaches the backend as None).
    logp, ent, *_ = _fwd_op(h2, weight.contiguous(), b, flat_labels, ignore_index,
                            with_entropy, name, float(grad_skip_threshold), frozen,
                            *schema_scalars(tf))
    logp = logp.view(shape)
    return (logp, ent.view(shape)) if with_entropy else logp
