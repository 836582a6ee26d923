"""Pure-PyTorch reference for every quantity in method.md sections 3 to 6.

Readable first: these are the ground truth of the tests (run them in float64) and the
fallback backend. They materialize full log-softmax tensors, so they are memory-hungry
at scale. Bold-faced names follow method.md:

    logp_t = z_t[y] - lse(z_t)                 token_logprobs
    H_t    = lse(z_t) - sum_v p_v z_v           token_logprobs(with_entropy=True)
    s_i    = sum_t m_t logp_t  (or mean)        sequence_logprobs
    ell_i  = s_i - log P^R(x_i)                 log_weights
    W_i    = scheme(ell)_i                      weights
    L_CPO, L_DR, L_OO, L_SFT, entropy, KL       cpo_objective, dr_cpo_objective, ...

The objectives here loop over rows in the obvious way; ``cpo_fast.objectives`` holds the
vectorized, log-space, distributed-aware versions that the tests compare against these.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logprobs(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits)[labels] (and entropy); 0 at ignore_index positions.

    Computes in float32 for half inputs, in the input dtype otherwise (float64 in tests).
    """
    z = _upcast(logits)
    valid = labels != ignore_index
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
    ignore_index: int = -100, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """token_logprobs(hidden @ weight.T + bias, labels): materializes the logits."""
    logits = _upcast(hidden) @ _upcast(weight).T
    if bias is not None:
        logits = logits + _upcast(bias)
    return token_logprobs(logits, labels, ignore_index=ignore_index, with_entropy=with_entropy)


def token_logprobs_grad(
    logits: Tensor, labels: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None = None,
    *, ignore_index: int = -100,
) -> Tensor:
    """The closed form of method.md section 6: G([v==y] - p) - E p (log p + H)."""
    z = _upcast(logits)
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
    return torch.where(valid, g, torch.zeros_like(g))


def sequence_logprobs(token_logp: Tensor, mask: Tensor, *, length_normalize: bool = False) -> Tensor:
    """s_i = sum_t m_t logp_t over [B, T], or the mean over masked tokens."""
    m = mask.to(token_logp.dtype)
    s = (token_logp * m).sum(-1)
    if length_normalize:
        s = s / m.sum(-1).clamp_min(1)
    return s


def log_weights(seq_logp: Tensor, log_propensity: Tensor) -> Tensor:
    """ell_i = s_i - log P^R(x_i)."""
    return seq_logp - log_propensity


def weights(ell: Tensor, scheme: str, *, max_log_weight: float = 50.0, tau: float = 10.0) -> Tensor:
    """W_i for the schemes that are a per-row weight (raw, self_normalized, truncated).

    ``clipped`` is an objective, not a weight: its W is the raw weight (see
    :func:`weighted_objective`).
    """
    n = ell.shape[0]
    if scheme in ("raw", "clipped"):
        return torch.exp(ell.clamp(-max_log_weight, max_log_weight))
    if scheme == "self_normalized":
        e = torch.exp(ell - ell.max())
        return n * e / e.sum()
    if scheme == "truncated":
        return torch.clamp(torch.exp(ell.clamp(max=max_log_weight)), max=tau)
    raise ValueError(scheme)


def weighted_objective(
    ell: Tensor, a: Tensor, scheme: str, *, max_log_weight: float = 50.0, tau: float = 10.0,
    clip_eps: tuple[float, float] = (0.2, 0.2),
) -> Tensor:
    """(1/n) sum_i obj_i with obj_i = W_i a_i, or min(W a, clip(W) a) for ``clipped``.

    Differentiable in ell. Written as an explicit loop over rows.
    """
    n = ell.shape[0]
    if scheme == "self_normalized":
        m = ell.max()
        denom = torch.exp(ell - m).sum()
        terms = [n * torch.exp(ell[i] - m) / denom * a[i] for i in range(n)]
    elif scheme == "clipped":
        terms = []
        for i in range(n):
            w = torch.exp(ell[i].clamp(-max_log_weight, max_log_weight))
            wc = w.clamp(1 - clip_eps[0], 1 + clip_eps[1])
            terms.append(torch.minimum(w * a[i], wc * a[i]))
    else:
        W = weights(ell, scheme, max_log_weight=max_log_weight, tau=tau)
        terms = [W[i] * a[i] for i in range(n)]
    return torch.stack(terms).sum() / n


def cpo_objective(ell: Tensor, y: Tensor, scheme: str, **kw) -> Tensor:
    """L_CPO = -(1/n) sum_i W_i y_i (y already signed so that higher is better)."""
    return -weighted_objective(ell, y, scheme, **kw)


def dr_cpo_objective(ell: Tensor, y: Tensor, ghat: Tensor, ell_dm: Tensor, ghat_dm: Tensor,
                     scheme: str, **kw) -> Tensor:
    """L_DR = -(1/n) sum W_i (y_i - ghat_i) - (1/m) sum_j W'_j ghat'_j."""
    return -weighted_objective(ell, y - ghat, scheme, **kw) - weighted_objective(
        ell_dm, ghat_dm, scheme, **kw)


def oo_rlhf_objective(ell_dm: Tensor, ghat_dm: Tensor, scheme: str, **kw) -> Tensor:
    """L_OO = -(1/m) sum_j W'_j ghat'_j."""
    return -weighted_objective(ell_dm, ghat_dm, scheme, **kw)


def sft_objective(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over masked tokens."""
    m = mask.to(token_logp.dtype)
    return -(token_logp * m).sum() / m.sum().clamp_min(1)


def entropy_term(entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """-c_H * mean_t H_t over masked tokens."""
    m = mask.to(entropy.dtype)
    return -coef * (entropy * m).sum() / m.sum().clamp_min(1)


def kl_k3(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor) -> Tensor:
    """mean_t over masked tokens of exp(r_t) - r_t - 1, r_t = ref_logp_t - logp_t."""
    r = ref_token_logp - token_logp
    m = mask.to(token_logp.dtype)
    return ((torch.exp(r) - r - 1) * m).sum() / m.sum().clamp_min(1)


def ess(W: Tensor) -> Tensor:
    """(sum W)^2 / sum W^2."""
    return W.sum() ** 2 / (W**2).sum()


def max_weight_share(W: Tensor) -> Tensor:
    return W.max() / W.sum()
