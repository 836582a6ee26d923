"""Small causal LMs built from a config, and a model's fingerprint (what the caches key on).

Models are never downloaded: :func:`build_model` makes a Llama-, Qwen2- or GPT-2-style
decoder from a config (the same code path works on any Hugging Face causal LM loaded by
the user). Token log-probabilities of any of them come from
:func:`cpo_fast.models.token_batch` (backbone, then the fused-linear op: the
[B, T, V] logits are never built).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from typing import Any

import torch

from cpo_fast.models import _base
from cpo_fast.pipeline.run.config import ARCHS


def _attn_impl(device: str | torch.device | None) -> str:
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(
    arch: str = "llama",
    vocab_size: int = 1000,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    tie_word_embeddings: bool = False,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    intermediate_size: int | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    seed: int | None = None,
    **config_overrides: Any,
) -> Any:
    """A randomly initialized causal LM of family ``arch`` ("llama", "qwen2", "gpt2").

    Dropout is 0 (policy and reference log-probs must be comparable in train mode).
    Attention is SDPA, or FlashAttention-2 when ``device`` is CUDA and ``flash_attn`` is
    importable; ``attn_implementation`` overrides. ``seed`` makes the init reproducible.
    ``config_overrides`` go to the config class as is.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    attn = attn_implementation or _attn_impl(device)
    special = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                   eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings)
    cfg, cls = _hf_config(arch, vocab_size, hidden_size, num_layers, num_heads, max_positions,
                          intermediate_size or 4 * hidden_size, special, config_overrides)
    cfg._attn_implementation = attn
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(cfg)
    else:
        model = cls(cfg)
    return model.to(device) if device is not None else model


def _hf_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
               max_positions: int, inter: int, special: dict, overrides: dict):
    """(transformers config, model class) of a dropout-free ``arch`` decoder."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                         n_head=num_heads, n_positions=max_positions, n_inner=inter,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special, **overrides)
        return cfg, GPT2LMHeadModel
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions,
                  attention_dropout=0.0, **special)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common), LlamaForCausalLM
    return Qwen2Config(**common), Qwen2ForCausalLM


_SKIP_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation",
                     "_attn_implementation_internal", "dtype", "torch_dtype",
                     "_commit_hash", "architectures"}


def model_fingerprint(model: Any) -> str:
    """blake2b hex digest of the model's class, config and the raw bytes of every tensor
    in its state dict (parameters and buffers, peft adapters included). Any change of
    any parameter changes it; the model's name does not enter it."""
    h = hashlib.blake2b(digest_size=20)
    base = _base(model)
    h.update(type(base).__name__.encode())
    cfg = getattr(base, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if k not in _SKIP_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()
