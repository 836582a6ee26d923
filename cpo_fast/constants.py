"""Literals shared across cpo_fast (one place, imported everywhere they are used)."""

IGNORE_INDEX = -100
"""Label of a position that gets no log-probability and no gradient (HF's convention)."""

MAX_LOG_WEIGHT = 50.0
"""Default clamp M on log importance weights for the raw / clipped / truncated schemes."""

TRUNCATION = 10.0
"""Default tau of the ``truncated`` weighting, min(W, tau)."""

CLIP_EPS = 0.2
"""Default eps of the PPO-style ``clipped`` weighting, clip(W, 1 - eps, 1 + eps)."""

ESS_TARGET = 0.5
"""Training default of ``ess_target`` (the CLI, the TRL trainer): each step tempers the
outcome and DM log weights so their ESS stays at half the effective batch or more. Chosen
over no remedy, clipping, the log-weight cap and KL on SmolLM2-135M by two independent
judges (benchmarks/results/real-remedies.md). The loss objects (``Objective``,
``DRCPOLoss``, the HF mixin) default to 0: the estimator as written."""

WEIGHTINGS = ("raw", "self_normalized", "clipped", "truncated")
"""The importance-weighting schemes of the IPW objectives."""
