"""Pure-PyTorch reference for every quantity of docs/math.md, under the public names.

Each function here has the name and the parameters of its fast counterpart
(``cpo_fast.token_logprobs``, ``cpo_fast.dr_cpo_loss``, ...), so a test, or a reader, can
put the two side by side. Readable first: these are the ground truth of the tests (run them
in float64) and the ``"reference"`` backend of the ops. They materialize full log-softmax
tensors (memory-hungry at scale) and loop over rows in the obvious way, where
``cpo_fast.objectives`` is vectorized, log-space and distributed-aware:

    logp_t = z_t[y] - lse(z_t)                 token_logprobs
    H_t    = lse(z_t) - sum_v p_v z_v           token_logprobs(with_entropy=True)
    dL/dz  = G([v==y] - p) - E p (log p + H)    token_logprobs_grad
    z' = (c tanh(s z / c) or s z) / T           apply_head_transform (HeadTransform)
    s_i    = sum_t m_t logp_t  (or mean)        sequence_logprobs
    ell_i  = s_i - log P^R(x_i)                 log_weights
    W_i    = weighting(ell)_i                   weights
    L_CPO, L_DR, L_OO                           cpo_loss, dr_cpo_loss, oo_rlhf_loss
    L_SFT, entropy bonus, KL (k3)               sft_loss, entropy_bonus, kl_penalty
    ESS, max weight share                       ess, max_weight_share
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpo_fast._transform import HeadTransform
from cpo_fast.constants import CLIP_EPS, IGNORE_INDEX, MAX_LOG_WEIGHT, TRUNCATION, WEIGHTINGS
from cpo_fast.estimators import LossOutput


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---- per-token log-probabilities ---------------------------------------------------------

def apply_head_transform(z: Tensor, transform: HeadTransform | None) -> Tensor:
    """z' = (softcap tanh(u / softcap) if softcap else u) / temperature, u = logit_scale z.

    The order of Hugging Face models and TRL: scale, cap, then divide by the temperature.
    A -inf logit becomes -softcap / temperature under a softcap (tanh(-inf) = -1), with a
    zero gradient. None or the identity returns ``z`` itself.
    """
    if transform is None or transform.is_identity:
        return z
    temperature, softcap, logit_scale = transform.temperature, transform.softcap, transform.logit_scale
    u = z * logit_scale if logit_scale != 1.0 else z
    if softcap is not None:
        u = torch.tanh(u / softcap) * softcap
    return u / temperature if temperature != 1.0 else u


def token_logprobs(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX,
    with_entropy: bool = False, temperature: float = 1.0, softcap: float | None = None,
    logit_scale: float = 1.0, transform: HeadTransform | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(z')[labels] (and entropy) with z' = :func:`apply_head_transform` (logits)
    for ``transform`` or the three scalars (``HeadTransform.of``); 0 at ignore_index positions.

    Computes in float32 for half inputs, in the input dtype otherwise (float64 in tests).
    """
    valid = labels != ignore_index
    # Ignored rows are zeroed before the softmax: a NaN there must reach neither the output
    # nor (through log_softmax's backward, where 0 * NaN = NaN) the gradient.
    z = torch.where(valid.unsqueeze(-1), _upcast(logits), 0.0)
    z = apply_head_transform(z, HeadTransform.of(transform, temperature, softcap, logit_scale))
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp
    p = logsm.exp()
    # 0 * log 0 = 0: mask before multiplying so no NaN enters the graph (-inf logits).
    finite_logsm = torch.where(p > 0, logsm, torch.zeros_like(logsm))
    ent = -(p * finite_logsm).sum(-1)
    ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX, with_entropy: bool = False, temperature: float = 1.0,
    softcap: float | None = None, logit_scale: float = 1.0, transform: HeadTransform | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """token_logprobs(hidden @ weight.T + bias, labels, transform): materializes the logits."""
    # Ignored rows are zeroed (and get no gradient): a NaN in their hidden state must not
    # reach grad_weight, nor a NaN weight their grad_hidden (0 * NaN = NaN in a matmul).
    valid = (labels != ignore_index).unsqueeze(-1)
    logits = torch.where(valid, _upcast(hidden), 0.0) @ _upcast(weight).T
    if bias is not None:
        logits = logits + _upcast(bias)
    return token_logprobs(logits, labels, ignore_index=ignore_index, with_entropy=with_entropy,
                          transform=HeadTransform.of(transform, temperature, softcap,
                                                     logit_scale))


def token_logprobs_grad(
    logits: Tensor, labels: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None = None,
    *, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0, softcap: float | None = None,
    logit_scale: float = 1.0, transform: HeadTransform | None = None,
) -> Tensor:
    """The closed form dL/dz = G([v==y] - p) - E p (log p + H) (docs/math.md), p the softmax
    of z' = apply_head_transform(z), times the chain-rule factor dz'/dz =
    (logit_scale / temperature) (1 - tanh(logit_scale z / softcap)^2 if softcap else 1)."""
    tf = HeadTransform.of(transform, temperature, softcap, logit_scale)
    temperature, softcap, logit_scale = tf.temperature, tf.softcap, tf.logit_scale
    raw = _upcast(logits)
    z = apply_head_transform(raw, tf)
    valid = (labels != ignore_index).unsqueeze(-1)
    logsm = torch.log_softmax(z, dim=-1)
    p = logsm.exp()
    onehot = torch.zeros_like(z)
    safe = torch.where(labels != ignore_index, labels, torch.zeros_like(labels)).long()
    onehot.scatter_(-1, safe.unsqueeze(-1), 1.0)
    g = grad_logp.unsqueeze(-1).to(z.dtype) * (onehot - p)
    if grad_entropy is not None:
        finite = torch.where(p > 0, logsm, torch.zeros_like(logsm))
        H = -(p * finite).sum(-1, keepdim=True)
        g = g - grad_entropy.unsqueeze(-1).to(z.dtype) * p * (finite + H)
    if softcap is not None:
        g = g * (1 - torch.tanh(raw * logit_scale / softcap) ** 2)
    g = g * (logit_scale / temperature)
    return torch.where(valid, g, torch.zeros_like(g))


def sequence_logprobs(token_logp: Tensor, mask: Tensor, *, length_normalize: bool = False) -> Tensor:
    """s_i = sum_t m_t logp_t over [B, T], or the mean over masked tokens."""
    m = mask.to(token_logp.dtype)
    s = (token_logp * m).sum(-1)
    if length_normalize:
        s = s / m.sum(-1).clamp_min(1)
    return s


# ---- importance weights ------------------------------------------------------------------

def log_weights(seq_logp: Tensor, log_propensity: Tensor) -> Tensor:
    """ell_i = s_i - log P^R(x_i)."""
    return seq_logp - log_propensity


def weights(ell: Tensor, weighting: str, *, max_log_weight: float = MAX_LOG_WEIGHT,
            truncation: float = TRUNCATION) -> Tensor:
    """W_i for the schemes that are a per-row weight (raw, self_normalized, truncated).

    ``clipped`` is an objective, not a weight: its W is the raw weight (see
    :func:`_weighted_mean`).
    """
    n = ell.shape[0]
    if weighting in ("raw", "clipped"):
        return torch.exp(ell.clamp(-max_log_weight, max_log_weight))
    if weighting == "self_normalized":
        e = torch.exp(ell - ell.max())
        return n * e / e.sum()
    if weighting == "truncated":
        return torch.clamp(torch.exp(ell.clamp(-max_log_weight, max_log_weight)), max=truncation)
    raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}.")


def ess(W: Tensor) -> Tensor:
    """(sum W)^2 / sum W^2, computed in float64 (the textbook formula)."""
    W = W.double()
    return W.sum() ** 2 / (W**2).sum()


def max_weight_share(W: Tensor) -> Tensor:
    """max W / sum W, computed in float64."""
    W = W.double()
    return W.max() / W.sum()


def _weighted_mean(ell: Tensor, a: Tensor, weighting: str, *, max_log_weight: float,
                   truncation: float, clip_eps: tuple[float, float]) -> Tensor:
    """(1/n) sum_i obj_i with obj_i = W_i a_i, or min(W a, clip(W) a) for ``clipped``.

    Differentiable in ell. Written as an explicit loop over rows.
    """
    n = ell.shape[0]
    if weighting == "self_normalized":
        m = ell.max()
        denom = torch.exp(ell - m).sum()
        terms = [n * torch.exp(ell[i] - m) / denom * a[i] for i in range(n)]
    elif weighting == "clipped":
        terms = []
        for i in range(n):
            w = torch.exp(ell[i].clamp(-max_log_weight, max_log_weight))
            wc = w.clamp(1 - clip_eps[0], 1 + clip_eps[1])
            terms.append(torch.minimum(w * a[i], wc * a[i]))
    else:
        W = weights(ell, weighting, max_log_weight=max_log_weight, truncation=truncation)
        terms = [W[i] * a[i] for i in range(n)]
    return torch.stack(terms).sum() / n


# ---- objectives (same signatures as cpo_fast.objectives) ---------------------------------

def dr_cpo_loss(
    policy_logp: Tensor | None, ref_logp: Tensor | None, outcome: Tensor | None,
    outcome_pred: Tensor | None = None, *, dm_policy_logp: Tensor | None = None,
    dm_ref_logp: Tensor | None = None, dm_outcome_pred: Tensor | None = None,
    weighting: str = "self_normalized", higher_is_better: bool = True,
    max_log_weight: float = MAX_LOG_WEIGHT, truncation: float = TRUNCATION,
    clip_eps: float | tuple[float, float] = CLIP_EPS, distributed: bool | None = None,
) -> LossOutput:
    """L_DR = -(1/n) sum_i W_i (y_i - ghat_i) - (1/m) sum_j W'_j ghat'_j (signed so that
    higher is better); CPO without ghat, the outcome rows as DM set when only ghat is given.

    Returns a LossOutput with ``loss``, ``value``, ``weights``, ``ess``,
    ``max_weight_share`` (outcome rows) and ``dm_weights``/``dm_ess`` (DM rows); no checks,
    no clamp reporting, single process only.
    """
    if distributed:
        raise ValueError("the reference dr_cpo_loss is single-process: distributed=False.")
    sign = 1.0 if higher_is_better else -1.0
    eps = (clip_eps, clip_eps) if isinstance(clip_eps, (int, float)) else tuple(clip_eps)
    kw = dict(max_log_weight=max_log_weight, truncation=truncation, clip_eps=eps)
    out, total = LossOutput(), 0.0
    if policy_logp is not None:
        ell = log_weights(policy_logp, ref_logp)
        a = sign * outcome if outcome_pred is None else sign * (outcome - outcome_pred)
        total = total - _weighted_mean(ell, a, weighting, **kw)
        if outcome_pred is not None and dm_policy_logp is None:
            dm_policy_logp, dm_ref_logp, dm_outcome_pred = policy_logp, ref_logp, outcome_pred
        out.weights = _scheme_weights(ell.detach(), weighting, **kw)
        out.ess, out.max_weight_share = ess(out.weights), max_weight_share(out.weights)
    if dm_policy_logp is not None:
        ell_dm = log_weights(dm_policy_logp, dm_ref_logp)
        total = total - _weighted_mean(ell_dm, sign * dm_outcome_pred, weighting, **kw)
        out.dm_weights = _scheme_weights(ell_dm.detach(), weighting, **kw)
        out.dm_ess = ess(out.dm_weights)
    out.loss = total
    out.value = -sign * total.detach()
    return out


def _scheme_weights(ell: Tensor, weighting: str, **kw) -> Tensor:
    kw.pop("clip_eps", None)
    return weights(ell, weighting, **kw)


def cpo_loss(policy_logp: Tensor, ref_logp: Tensor, outcome: Tensor, **kw) -> LossOutput:
    """L_CPO = -(1/n) sum_i W_i y_i."""
    return dr_cpo_loss(policy_logp, ref_logp, outcome, **kw)


def oo_rlhf_loss(dm_policy_logp: Tensor, dm_ref_logp: Tensor, dm_outcome_pred: Tensor,
                 **kw) -> LossOutput:
    """L_OO = -(1/m) sum_j W'_j ghat'_j."""
    out = dr_cpo_loss(None, None, None, dm_policy_logp=dm_policy_logp,
                      dm_ref_logp=dm_ref_logp, dm_outcome_pred=dm_outcome_pred, **kw)
    out.weights, out.ess = out.dm_weights, out.dm_ess
    out.max_weight_share = max_weight_share(out.weights)
    return out


def sft_loss(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over masked tokens."""
    m = mask.to(token_logp.dtype)
    return -(token_logp * m).sum() / m.sum().clamp_min(1)


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """-c_H * mean_t H_t over masked tokens."""
    m = mask.to(entropy.dtype)
    return -coef * (entropy * m).sum() / m.sum().clamp_min(1)


def kl_penalty(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor,
               coef: float = 1.0) -> Tensor:
    """coef * mean_t over masked tokens of exp(r_t) - r_t - 1, r_t = ref_logp_t - logp_t."""
    r = ref_token_logp - token_logp
    m = mask.to(token_logp.dtype)
    return coef * ((torch.exp(r) - r - 1) * m).sum() / m.sum().clamp_min(1)


__all__ = [
    "apply_head_transform", "cpo_loss", "dr_cpo_loss", "entropy_bonus", "ess", "kl_penalty",
    "linear_token_logprobs",
    "log_weights", "max_weight_share", "oo_rlhf_loss", "sequence_logprobs", "sft_loss",
    "token_logprobs", "token_logprobs_grad", "weights",
]
