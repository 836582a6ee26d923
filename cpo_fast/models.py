r"""Model-level drop-in: per-token log-probs of a Hugging Face causal LM, logits never built.

    import cpo_fast
    logp = cpo_fast.causal_lm_token_logprobs(model, input_ids, labels,
                                             attention_mask=attention_mask)   # [B, T-1] fp32
    loss = -(logp.sum() / (labels[:, 1:] != -100).sum())                      # e.g. SFT
    loss.backward()

The backbone runs as usual; its last hidden states go straight into
:func:`cpo_fast.linear_token_logprobs` with the output layer's weight (and bias), so the
[B, T, V] logits tensor never exists. Any model whose head is a linear layer works: Llama,
Qwen2, Mistral, Gemma, GPT-2, ..., tied or untied embeddings, peft-wrapped (LoRA on the
backbone; LoRA or ``modules_to_save`` on the head too: the effective head weight is formed,
differentiably, as ``W + sum_a scale_a B_a A_a``), FSDP2-sharded heads (gathered by the op).

Head transforms. Some families transform the logits after the head; the model's own forward
applies them, so a fused path that ignored them would be silently wrong. They are read from
the (text) config by ``HeadTransform.from_model`` (cpo_fast/_transform.py) and passed to the
op as one value, which applies, per logit,

    z' = softcap * tanh(logit_scale * z / softcap) / temperature   (softcap None: no tanh)

======================================  ================================================
config field                            transform
======================================  ================================================
``final_logit_softcapping`` (Gemma 2/3)  ``softcap``
``logit_scale`` (Cohere; MPT float or    ``logit_scale`` (MPT's ``"inv_sqrt_d_model"``
``"inv_sqrt_d_model"``)                  is ``1 / sqrt(d_model)``)
``output_multiplier`` (Muse Glimmer)     ``logit_scale``
``lm_head_multiplier`` (Falcon-H1)       ``logit_scale``
``logits_scaling`` (Granite, MiniCPM3;   ``logit_scale = 1 / logits_scaling``
HyperCLOVA X multiplies)                 (``logits_scaling`` for ``hyperclovax``)
======================================  ================================================

The first scale field found wins, in that order (as TRL 1.16 reads them). Fields known to
transform the head in ways this function does not model (``mup_width_multiplier``,
``dim_model_base``) raise an error naming the field. ``temperature`` is the sampler's (the
logits are divided by it after the model's own transforms), as in TRL's trainers.

The batch dictionary, :func:`collate`, its writer for tokenized rows (the pipeline's; the
Hugging Face mixin and ``DRCPOTrainer`` build it from their own collators), and
:func:`token_batch`, its one reader:

    input_ids        [B, T]    token ids
    attention_mask   [B, T]    optional
    labels           [B, T]    HF convention: unshifted, IGNORE_INDEX (-100) on the prompt
                               and padding; shifted once, in causal_lm_token_logprobs, and
                               the counted tokens are ``labels[:, 1:] != -100``
    outcome          [B]       y (outcome rows)
    outcome_pred     [B]       ghat, cross-fitted (DR-CPO's outcome rows, and the DM rows)
    ref_token_logp   [B, T-1]  f_0's token log-probs aligned with ``labels[:, 1:]``
    ref_logp         [B]       a known log P^R(x) (e.g. a logged propensity); replaces the
                               sum of ``ref_token_logp`` in the weights

Every per-token tensor of a :class:`TokenBatch` (what the objectives read) is ``[B, T-1]``
and aligned with ``labels[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cpo_fast._transform import HeadTransform
from cpo_fast.constants import IGNORE_INDEX
from cpo_fast.ops import linear_token_logprobs


def _base(model: Any) -> Any:
    """Unwrap peft (PeftModel -> the transformers model)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder(model: Any) -> nn.Module:
    """The backbone of a causal LM (through peft wrappers): everything but the head."""
    base = _base(model)
    get = getattr(base, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:  # older/odd models: the backbone under base_model_prefix
        dec = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if dec is None or dec is base:
        raise ValueError(f"cannot find the decoder backbone of {type(base).__name__}; "
                         "it needs get_decoder() or a base_model_prefix attribute.")
    return dec


def last_hidden(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states [B, T, d] from the backbone only (the lm_head never runs)."""
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def output_weight(model: Any) -> tuple[Tensor, Tensor | None]:
    """(weight [V, d], bias [V] or None) of the output layer, as the model's forward uses it.

    A peft LoRA head gives ``W + sum_a B_a A_a * scale_a`` over its active adapters (unless
    merged or disabled), a ``modules_to_save`` head its active copy: differentiable either way.
    """
    head = _base(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?).")
    saved = getattr(head, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict):  # peft ModulesToSaveWrapper
        active = head.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) else active
        if not getattr(head, "disable_adapters", False) and active in saved:
            head = saved[active]
        else:
            head = head.original_module
    if hasattr(head, "get_delta_weight") and hasattr(head, "base_layer"):  # peft LoRA layer
        weight, bias = head.base_layer.weight, head.base_layer.bias
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in head.lora_A:
                    weight = weight + head.get_delta_weight(name)
        return weight, bias
    if not isinstance(head, nn.Linear) and not (
            hasattr(head, "weight") and getattr(head.weight, "dim", lambda: 0)() == 2):
        raise TypeError(f"the output layer is a {type(head).__name__}, not a linear layer; "
                        "cpo_fast's fused head needs lm_head(h) = h @ W.T + b.")
    return head.weight, getattr(head, "bias", None)


def _check_token_ids(model, input_ids: Tensor) -> None:
    """Ids outside the embedding would read out of bounds (torch's bare IndexError at best)."""
    if input_ids.is_floating_point() or input_ids.numel() == 0:
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one device sync, not two
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary "
                         f"[0, {vocab}); tokenize with the model's own tokenizer (or resize "
                         "its embeddings with model.resize_token_embeddings).")


def causal_lm_token_logprobs(
    model: Any,
    input_ids: Tensor,
    labels: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    backend: str | None = None,
    hidden: Tensor | None = None,
    grad_coef: Tensor | None = None,
    grad_coef_entropy: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs [B, T-1] of ``labels[:, 1:]`` under ``model``, without logits.

    Args:
        model: a Hugging Face causal LM (or a peft model around one) whose head is linear.
        input_ids: ``[B, T]``.
        labels: ``[B, T]`` in the HF convention (unshifted; ``-100`` on prompt and padding);
            default: ``input_ids`` with ``-100`` where ``attention_mask`` is 0.
        attention_mask: ``[B, T]`` or None.
        with_entropy: also return the per-token entropies.
        temperature: divide the (transformed) logits by this, as a sampler would.
        backend: as in :func:`cpo_fast.token_logprobs`.
        hidden: the backbone's last hidden states if already computed (skips the backbone).
        grad_coef, grad_coef_entropy: ``[B, T-1]``, the loss's gradient with respect to
            ``logp`` (and the entropy) when known before the forward: a trained head then
            forms its gradient in the forward (see :func:`cpo_fast.linear_token_logprobs`).

    Returns:
        ``logp`` float32 ``[B, T-1]`` aligned with ``labels[:, 1:]`` (0 where ignored), or
        ``(logp, entropy)``. Differentiable in every trainable parameter.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(
            attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}; pass unshifted HF-convention labels.")
    _check_token_ids(model, input_ids)
    if hidden is None:
        hidden = last_hidden(model, input_ids, attention_mask)
    weight, bias = output_weight(model)
    transform = HeadTransform.from_model(model, temperature=temperature)
    return linear_token_logprobs(hidden[:, :-1], weight, labels[:, 1:].to(weight.device),
                                 bias=bias, with_entropy=with_entropy, backend=backend,
                                 transform=transform, grad_coef=grad_coef,
                                 grad_coef_entropy=grad_coef_entropy)


@dataclass
class TokenBatch:
    """Per-token tensors of one set of sequences, ``[B, T-1]`` and aligned, plus its per-row
    values: what :class:`cpo_fast.objectives.Objective` reads."""

    logp: Tensor  # the policy's token log-probs (differentiable)
    mask: Tensor  # True on the tokens that count (completion, not prompt or padding)
    ref_logp: Tensor | None = None  # the reference model's (f_0's) token log-probs
    entropy: Tensor | None = None  # the policy's token entropies (for entropy_coef)
    outcome: Tensor | None = None  # y [B]
    outcome_pred: Tensor | None = None  # ghat [B] (cross-fitted)
    log_propensity: Tensor | None = None  # [B] log P^R(x), replaces sum_t ref_logp


def counted_tokens(labels: Tensor) -> Tensor:
    """``[B, T-1]``: True where an unshifted HF label counts (the next token is scored)."""
    return labels[:, 1:] != IGNORE_INDEX


def counted(inputs: dict[str, Tensor] | None) -> int:
    """How many tokens of a batch dictionary count (0 for None)."""
    return 0 if inputs is None else int(counted_tokens(inputs["labels"]).sum())


def token_batch(model: Any, inputs: dict[str, Tensor], *, with_entropy: bool = False,
                backend: str | None = None,
                grad_coef: tuple[Tensor, Tensor | None] | None = None) -> TokenBatch:
    """The policy's token log-probs of ``inputs`` (fused-linear op, logits never built) with
    the batch's reference log-probs and per-row values, all in float32. ``grad_coef``: the
    loss's (dL/dlogp, dL/dH or None) when known before the forward (see
    :func:`causal_lm_token_logprobs`)."""
    g, g_ent = grad_coef or (None, None)
    out = causal_lm_token_logprobs(model, inputs["input_ids"], inputs["labels"],
                                   attention_mask=inputs.get("attention_mask"),
                                   with_entropy=with_entropy, backend=backend, grad_coef=g,
                                   grad_coef_entropy=g_ent if with_entropy else None)
    return batch_of(inputs, *(out if with_entropy else (out, None)))


def batch_of(inputs: dict[str, Tensor], logp: Tensor, entropy: Tensor | None = None) -> TokenBatch:
    """The TokenBatch of a batch dictionary with the given token log-probs (and entropies)."""

    def row(key: str) -> Tensor | None:
        v = inputs.get(key)
        return None if v is None else v.to(logp.dtype)

    return TokenBatch(logp, counted_tokens(inputs["labels"]),
                      ref_logp=row("ref_token_logp"), entropy=entropy, outcome=row("outcome"),
                      outcome_pred=row("outcome_pred"), log_propensity=row("ref_logp"))


def collate(encoded: Any, indices: Sequence[int], pad_id: int,
            outcomes: np.ndarray | None = None,
            log_propensity: np.ndarray | None = None,
            pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch dictionary of rows ``indices`` (positions into ``encoded``, which
    has ``input_ids``, one token-id list per row, and ``score_start``, the position of each
    row's first scored token: the pipeline's ``Encoded``), ``T`` rounded up to a multiple of
    ``pad_to_multiple``.

    Returns the batch dictionary above: ``input_ids``/``attention_mask``
    [B, T], ``labels`` [B, T] (HF convention, unshifted: ``input_ids`` with IGNORE_INDEX on
    the prompt and padding), ``index`` [B], and ``outcome`` / ``ref_logp`` (the known log
    propensity) [B] float32 when the full-length arrays are given (indexed by ``indices``).
    """
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("collate: empty batch (indices is empty).")
    rows = [encoded.input_ids[i] for i in idx]
    T = -(-max(len(r) for r in rows) // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (i, r) in enumerate(zip(idx, rows, strict=True)):
        L = len(r)
        t = torch.tensor(r, dtype=torch.long)
        input_ids[b, :L] = t
        attn[b, :L] = 1
        s = encoded.score_start[i]
        labels[b, s:L] = t[s:L]
    out = {"input_ids": input_ids, "attention_mask": attn, "labels": labels,
           "index": torch.tensor(idx, dtype=torch.long)}
    if outcomes is not None:
        out["outcome"] = torch.as_tensor(np.asarray(outcomes)[idx], dtype=torch.float32)
    if log_propensity is not None:
        out["ref_logp"] = torch.as_tensor(np.asarray(log_propensity)[idx], dtype=torch.float32)
    return out


__all__ = ["TokenBatch", "batch_of", "causal_lm_token_logprobs", "collate", "counted", "counted_tokens",
           "decoder", "last_hidden", "output_weight", "token_batch"]
