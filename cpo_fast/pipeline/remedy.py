"""Per-row log-weight capping: a remedy for importance-weight collapse (docs/validity.md).

A sequence weight multiplies one ratio per token, so after a few steps one long text can
carry most of a batch's weight (ESS near 1) while the policy has barely moved: on the DM
set that is how DR-CPO ends up optimizing ghat on a handful of texts. The cap bounds each
row's log weight to ``center +- cap``, where ``center`` is the batch median (detached) for
self-normalized weights (a shift of all log weights does not change them) and 0 otherwise:

    ell_i  ->  center + clamp(ell_i - center, -cap, cap)

A row at the cap gets no gradient pushing it further (a per-row trust region, like PPO's
clipping, but around the batch rather than around 1), and the self-normalized weights then
differ by at most a factor exp(2 cap), which bounds the ESS from below: for a ratio
r = exp(2 cap), ESS / n >= 4 r / (1 + r)^2 (Kantorovich's inequality, a two-point worst
case); cap = 0.7 gives r = 4.1 and ESS >= 63% of the batch, cap = 1.4 gives r = 16.4 and
ESS >= 21.6%, above the ESS guard's 10%. The bound is on the weights actually used: a
capped run can still drift far from f_0 (watch the share of generations outside ghat's
support), which is why the cap is evaluated, not assumed (docs/validity.md).
"""

from __future__ import annotations

import torch

from cpo_fast.objectives import cap_log_weights  # noqa: F401  (re-exported: the remedy)


def min_ess_share(cap: float) -> float:
    """The smallest ESS / n that capped self-normalized weights can have."""
    r = float(torch.exp(torch.tensor(2.0 * cap)))
    return 4.0 * r / (1.0 + r) ** 2
