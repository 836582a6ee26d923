"""Input validation shared by the public ops: clear errors, never an out-of-bounds read."""

from __future__ import annotations

import math
import warnings

import torch

from cpo_fast._transform import HeadTransform


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got {t.dtype}; cast it with .float()."
        )


def check_labels(
    labels: torch.Tensor, expected_shape: torch.Size, vocab: int, ignore_index: int, *,
    what: str = "logits.shape[:-1]", validate: bool = True,
) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}; use .long().")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but must equal {what} = "
            f"{tuple(expected_shape)}. Labels are aligned with the logits rows: shift them "
            "yourself (e.g. logits[:, :-1], input_ids[:, 1:])."
        )
    if validate and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            val = int(labels[tuple(idx)])
            raise ValueError(
                f"labels[{', '.join(map(str, idx))}] = {val} is outside the vocabulary "
                f"[0, {vocab}) and is not ignore_index={ignore_index}. Fix the tokenizer / "
                "vocabulary size, or mark the position with ignore_index."
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Outcomes, predictions and reference log-probs: NaN / +-inf raise with the index."""
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(
            f"{name} has a non-finite value ({t[tuple(bad)].item()}) at index {bad}; "
            "outcomes and predictions must be finite: drop or impute those rows."
        )


def check_same_shape(name: str, t: torch.Tensor | None, ref_name: str, ref: torch.Tensor) -> None:
    if t is not None and tuple(t.shape) != tuple(ref.shape):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but must match {ref_name} {tuple(ref.shape)}."
        )


def index_list(mask: torch.Tensor, limit: int = 5) -> str:
    idx = [tuple(i) if len(i) > 1 else i[0] for i in mask.nonzero()[:limit].tolist()]
    more = int(mask.sum()) - len(idx)
    return f"{idx}" + (f" and {more} more" if more > 0 else "")


def warn_nonfinite_rows(op: str, source: str, labels: torch.Tensor, ignore_index: int,
                        *outputs: torch.Tensor) -> None:
    """Warn, naming the rows, when an op's O(N) outputs are NaN or infinite on rows that
    are not ignored (the cheap check: never a pass over the N x V input)."""
    if labels.numel() == 0:
        return
    bad = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for out in outputs:
        bad |= ~torch.isfinite(out.detach())
    bad &= labels != ignore_index
    if bool(bad.any()):
        warnings.warn(
            f"cpo_fast.{op}: non-finite log-probability or entropy at rows (index into "
            f"labels) {index_list(bad)}: {source} holds NaN or +-inf there (or the label's "
            "logit is -inf). Check the model for overflow (e.g. fp16 logits) and the input "
            "data; pass validate=False to skip this check.",
            RuntimeWarning, stacklevel=3,
        )


def check_finite_seq(name: str, t: torch.Tensor) -> None:
    """Per-sequence policy log-probs: NaN / +-inf raise with the indices (no silent NaN)."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        vals = t.detach()[bad][:5].tolist()
        raise ValueError(
            f"{name} has non-finite values {vals} at indices {index_list(bad)}. Sequence "
            "log-probabilities must be finite: a NaN or inf comes from the model (overflow, "
            "NaN logits) or from a label whose logit is -inf; fix the model/data or drop "
            "those rows."
        )


def check_head_transform(tf: HeadTransform) -> HeadTransform:
    """The head transform of a fused op (built from its arguments by ``HeadTransform.of``):
    finite numbers, temperature and softcap positive (errors name the argument and the fix).
    Returns it with plain Python floats."""

    def number(name: str, x: object) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            if isinstance(x, torch.Tensor) and x.numel() == 1:
                raise TypeError(f"{name} must be a Python float, got a tensor; pass "
                                f"{name}={name}.item() (it is a constant of the op, not an input).")
            raise TypeError(f"{name} must be a float, got {type(x).__name__}.")
        return float(x)

    t = number("temperature", tf.temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {tf.temperature}; use 1.0 for "
                         "no temperature scaling (sampling at temperature 0 is greedy decoding, "
                         "which has no log-probabilities to compute).")
    c = None
    if tf.softcap is not None:
        c = number("softcap", tf.softcap)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"softcap must be None or finite and > 0, got {tf.softcap}; pass "
                             "softcap=None for no capping (e.g. a config's "
                             "final_logit_softcapping of None or 0 means none).")
    s = number("logit_scale", tf.logit_scale)
    if not math.isfinite(s):
        raise ValueError(f"logit_scale must be finite, got {tf.logit_scale}; use 1.0 for no "
                         "scaling.")
    return HeadTransform(t, c, s)
