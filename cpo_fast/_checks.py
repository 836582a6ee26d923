"""Input validation shared by the public ops: clear errors, never an out-of-bounds read."""

from __future__ import annotations

import torch


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
