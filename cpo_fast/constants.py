"""Literals shared across cpo_fast (one place, imported everywhere they are used)."""

IGNORE_INDEX = -100
"""Label of a position that gets no log-probability and no gradient (HF's convention)."""

MAX_LOG_WEIGHT = 50.0
"""Default clamp M on log importance weights for the raw / clipped / truncated schemes."""

TRUNCATION = 10.0
"""Default tau of the ``truncated`` weighting, min(W, tau)."""

CLIP_EPS = 0.2
"""Default eps of the PPO-style ``clipped`` weighting, clip(W, 1 - eps, 1 + eps)."""

WEIGHTINGS = ("raw", "self_normalized", "clipped", "truncated")
"""The importance-weighting schemes of the IPW objectives."""
