r"""Run TRL on cpo_fast: one line makes TRL's trainers compute per-token log-probs with our ops.

    import cpo_fast.integrations.trl as cpo_trl
    cpo_trl.apply()          # from here on TRL uses cpo_fast; cpo_trl.remove() undoes it
    with cpo_trl.enabled():  # or only inside a block
        trainer.train()

What is replaced (TRL >= 1.16; every TRL module that imported one of these by name gets
the replacement too, and :func:`remove` restores each attribute it changed):

=============================================  ==========================================
TRL hook (``trl.trainer.utils``)               computed by
=============================================  ==========================================
``selective_log_softmax(logits, index,         :func:`cpo_fast.token_logprobs` (one read of
temperature, row_mask)``                       the logits forward, one read + write back);
                                               top-K ``index [..., K]``: TRL's own
``entropy_from_logits(logits, chunk_size)``    :func:`cpo_fast.token_logprobs` entropy
``selective_log_softmax_and_entropy(...)``     both, in one pass
``_ChunkedLogProbFunction`` (the engine of     :func:`cpo_fast.linear_token_logprobs` for
``add_fused_lm_head``; ``model(...,            ``log_probs`` and ``entropy`` (temperature,
fused_lm_head=True)``)                         ``final_logit_softcapping`` and the logit
                                               scale included); ``log_sum_sq_probs``,
                                               ``mean_logits`` and ``is_top1`` (no gradient)
                                               by TRL's own kernel, only when requested
=============================================  ==========================================

So ``add_fused_lm_head`` keeps all of its own logic (backbone lookup, label shifting and
masking, DTensor gathering, ZeRO-3 gathering, the loss, MoE auxiliary loss) and only its
per-token engine changes. Under autocast the head runs in the autocast dtype, as TRL's does.
Differences to know: our outputs are float32 for half-precision logits (TRL's PyTorch
fallback returns the logits' dtype), and they are exact float32 log-softmax values.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.ops import linear_token_logprobs, token_logprobs

MIN_TRL = (1, 16)
_UTILS = "trl.trainer.utils"
_HOOKS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
          "_ChunkedLogProbFunction")
# Fields of TRL's FusedCausalLMOutput that cpo_fast computes; the rest come from TRL's kernel.
COMPUTED_FIELDS = ("log_probs", "entropy")
FALLBACK_FIELDS = ("log_sum_sq_probs", "mean_logits", "is_top1")

_originals: dict[str, Any] = {}          # hook name -> TRL's object
_patched: list[tuple[Any, str, Any]] = []  # (module, attribute, original) we changed
_backend: str | None = None


def _version(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _trl_utils() -> Any:
    if importlib.util.find_spec("trl") is None:
        raise ImportError("cpo_fast.integrations.trl needs TRL >= 1.16, which is not installed: "
                          "pip install 'cpo_fast[trl]' (or pip install 'trl>=1.16').")
    try:
        import trl
        import trl.trainer.utils as utils
    except ImportError as exc:  # TRL is there but fails to import: say why, not "install it"
        raise ImportError(f"cpo_fast.integrations.trl: TRL is installed but does not import: "
                          f"{type(exc).__name__}: {exc}") from exc
    missing = [h for h in _HOOKS if not hasattr(utils, h)]
    if missing or _version(trl.__version__) < MIN_TRL:
        raise RuntimeError(
            f"cpo_fast.integrations.trl needs TRL >= {'.'.join(map(str, MIN_TRL))}, found "
            f"{trl.__version__}" + (f" whose {_UTILS} lacks {missing}" if missing else "")
            + ": pip install -U 'trl>=1.16'."
        )
    return utils


# ---------------------------------------------------------------- logits-path replacements


def _labels(index: Tensor, row_mask: Tensor | None) -> Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, IGNORE_INDEX)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None) -> Tensor:
    """TRL's ``selective_log_softmax`` on :func:`cpo_fast.token_logprobs` (same signature)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.ndim != logits.ndim - 1:  # top-K gathering: TRL's own
        return _originals["selective_log_softmax"](logits, index, temperature, row_mask)
    return token_logprobs(logits, _labels(index, row_mask), temperature=temperature,
                          backend=_backend)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """TRL's ``entropy_from_logits`` on :func:`cpo_fast.token_logprobs` (``chunk_size`` unused:
    nothing of size N x V is allocated)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, with_entropy=True, backend=_backend)[1]


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor,
                                      entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: both in one pass over the logits."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logp, ent = token_logprobs(logits, _labels(index, row_mask), with_entropy=True,
                               temperature=temperature, backend=_backend)
    return logp, ent if entropy_requires_grad else ent.detach()


# ---------------------------------------------------------------- fused LM head engine


class ChunkedLogProbFunction:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: same ``apply`` signature and outputs
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (None where not asked)."""

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",),
              ) -> tuple[Tensor | None, ...]:
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):  # the head runs in the autocast dtype, as TRL's
            dt = torch.get_autocast_dtype(dev)
            hidden, weight = hidden.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        with_entropy = "entropy" in outputs
        out = linear_token_logprobs(hidden, weight, targets, bias=bias, with_entropy=with_entropy,
                                    temperature=temperature, softcap=final_logit_softcapping,
                                    logit_scale=logit_scale, backend=_backend)
        logp, ent = out if with_entropy else (out, None)
        extras = tuple(f for f in FALLBACK_FIELDS if f in outputs)
        rest: dict[str, Tensor | None] = dict.fromkeys(FALLBACK_FIELDS)
        if extras:  # no gradient through these (TRL documents them so): its own kernel
            with torch.no_grad():
                trl_out = _trl_engine().apply(
                    hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                    targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                    ("log_probs", *extras))
            rest.update(zip(("log_sum_sq_probs", "mean_logits", "is_top1"), trl_out[2:],
                            strict=True))
        return (logp, ent, rest["log_sum_sq_probs"], rest["mean_logits"], rest["is_top1"])


def _trl_engine() -> Any:
    """TRL's own fused-head engine (also when this class is used without :func:`apply`)."""
    engine = _originals.get("_ChunkedLogProbFunction")
    return engine if engine is not None else _trl_utils()._ChunkedLogProbFunction


_REPLACEMENTS: dict[str, Callable[..., Any] | type] = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
}


def _trl_modules() -> list[Any]:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def _swap(table: dict[int, Any]) -> list[tuple[Any, str, Any]]:
    """Replace, in every loaded TRL module, each attribute whose object's id is in ``table``."""
    changed = []
    for mod in _trl_modules():
        for attr, value in list(vars(mod).items()):
            new = table.get(id(value))
            if new is not None:
                setattr(mod, attr, new)
                changed.append((mod, attr, value))
    return changed


def apply(*, backend: str | None = None) -> None:
    """Make TRL use cpo_fast (idempotent). ``backend`` as in :func:`cpo_fast.token_logprobs`."""
    global _backend
    utils = _trl_utils()
    _backend = backend
    if is_applied():
        return
    for hook in _HOOKS:
        _originals[hook] = getattr(utils, hook)
    _patched.extend(_swap({id(_originals[h]): _REPLACEMENTS[h] for h in _HOOKS}))


def remove() -> None:
    """Restore every TRL attribute :func:`apply` changed (also in TRL modules imported since)."""
    if not is_applied():
        return
    for mod, attr, original in reversed(_patched):
        setattr(mod, attr, original)
    _patched.clear()
    # modules imported after apply() took our objects from the patched utils: restore them too
    _swap({id(_REPLACEMENTS[h]): _originals[h] for h in _HOOKS})
    _originals.clear()


def is_applied() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def enabled(*, backend: str | None = None) -> Iterator[None]:
    """``with enabled(): ...``: cpo_fast inside the block, TRL's own outside it."""
    was = is_applied()
    apply(backend=backend)
    try:
        yield
    finally:
        if not was:
            remove()


__all__ = ["COMPUTED_FIELDS", "FALLBACK_FIELDS", "ChunkedLogProbFunction", "apply", "enabled",
           "entropy_from_logits", "is_applied", "remove", "selective_log_softmax",
           "selective_log_softmax_and_entropy"]
