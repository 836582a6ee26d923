"""The weight-collapse guard: watch both effective sample sizes while a policy trains.

DR-CPO has two weighted sums, each with its own ESS = (sum W)^2 / sum W^2: the outcome
rows' (``ess``) and the direct-method set's (``dm_ess``). Either can collapse while the
other looks healthy; when the DM set's does, the policy is putting all its mass on the few
DM texts ghat scores highest, which is how a policy exploits the outcome model.

The guard compares each ESS, as a share of its batch, averaged over the last ``WINDOW``
logged steps (one noisy batch is not a collapse), with ``threshold`` (default 0.1, see
docs/validity.md: below it the weighted mean has at least ten times the variance of a mean
over the same number of on-policy rows, and the rows that carry the weight are fewer than
one in ten). The first time a share falls below it, the guard warns once with the step and
the remedy, records the step, and (``stop=True``) asks the loop to stop.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

THRESHOLD = 0.1
WINDOW = 5
REMEDY = ("lower --lr or --steps, add --kl-coef (KL to f_0 on the DM set), use "
          "--weighting clipped, or stop early with --stop-on-collapse; the result of this "
          "run is not trustworthy")


class WeightCollapseWarning(UserWarning):
    """An importance-weight ESS fell below the guard's threshold."""


def weight_stats(los: list[Any]) -> dict[str, float | None]:
    """DM max weight share (max W' / sum W', mean over micro-batches) from LossOutputs."""
    shares = [float(o.dm_weights.max() / o.dm_weights.sum().clamp_min(1e-30)) for o in los
              if getattr(o, "dm_weights", None) is not None and o.dm_weights.numel()]
    return {"dm_max_weight_share": float(np.mean(shares)) if shares else None}


@dataclass
class WeightGuard:
    """Feed it every step's metrics; see the module docstring."""

    threshold: float = THRESHOLD
    stop: bool = False
    batch_size: int = 1
    dm_batch_size: int = 1
    window: int = WINDOW
    quiet: bool = False  # record, do not warn (the ranks other than 0)
    collapsed_at: int | None = None
    collapsed_term: str | None = None
    min_share: dict[str, float] = field(default_factory=dict)
    _hist: dict[str, deque] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"--ess-guard must be in [0, 1) (a share of the batch; 0 turns "
                             f"the guard off), got {self.threshold}.")

    def shares(self, metrics: dict[str, Any], dm_only: bool = False) -> dict[str, float]:
        """ESS / batch rows of the outcome rows and of the DM set (those present).
        ``dm_only`` (OO-RLHF): the ``ess`` column is the DM set's."""
        out = {}
        if metrics.get("ess") is not None:
            out["ess"] = metrics["ess"] / max(1, self.dm_batch_size if dm_only else self.batch_size)
        if metrics.get("dm_ess") is not None and not dm_only:
            out["dm_ess"] = metrics["dm_ess"] / max(1, self.dm_batch_size)
        return out

    def update(self, step: int, metrics: dict[str, Any], dm_only: bool = False) -> bool:
        """Record one step; warn at the first collapse; True when the loop should stop."""
        for key, v in self.shares(metrics, dm_only).items():
            h = self._hist.setdefault(key, deque(maxlen=self.window))
            h.append(v)
            avg = float(np.mean(h))
            self.min_share[key] = min(self.min_share.get(key, np.inf), avg)
            if self.threshold and self.collapsed_at is None and avg < self.threshold:
                self.collapsed_at, self.collapsed_term = step, key
                if self.quiet:
                    continue
                name = "DM-set" if key == "dm_ess" or dm_only else "outcome-row"
                warnings.warn(
                    f"step {step}: the {name} importance weights collapsed (ESS {avg:.1%} of "
                    f"the batch over the last {len(h)} steps, below --ess-guard="
                    f"{self.threshold:g}); {REMEDY}.", WeightCollapseWarning, stacklevel=2)
        return self.stop and self.collapsed_at is not None

    def summary(self) -> dict[str, Any]:
        return {"weights_collapsed": self.collapsed_at is not None,
                "collapse_step": self.collapsed_at, "collapse_term": self.collapsed_term,
                **{f"min_{k}_share": round(v, 4) for k, v in self.min_share.items()}}
