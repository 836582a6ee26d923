"""Sampling from a causal LM at the token-id level: continuations of given prefixes.

Prefixes are lists of token ids that already start with BOS (as the pipeline's encoder
writes them); they are left-padded into one batch so HF ``generate`` can sample them
together, with the KV cache. Unconditioned generation is the special case of a one-token
prefix: the document start (:func:`cpo_fast.pipeline.stages.tokenizer.document_start`: BOS when the
tokenizer prepends it, else the pretraining separator ``<|endoftext|>``; never a chat
marker such as SmolLM2's ``<|im_start|>``). Sampling is seeded: the same seed, model and
prefixes give the same texts. Where the device computes bf16 natively (CUDA, or a CPU with
AVX512-BF16 / AMX, for models of 20M parameters and more: :func:`bf16_pays`) the forward
passes run under bf16 autocast (``bf16=True``, the default):
sampled texts are approximate draws either way, and every log-probability the estimators
use is recomputed from the ids in fp32 (precompute, training).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from tqdm.auto import tqdm

from cpo_fast.pipeline.stages.tokenizer import document_start


@cache
def _cpu_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device | str) -> bool:
    """Does ``device`` compute bf16 matmuls natively (so autocast to bf16 is faster)?"""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return d.type == "cpu" and _cpu_bf16()


# On the CPU bf16 pays only where matmuls dominate: SmolLM2-135M's passes ran 1.5-2x faster
# (benchmarks/results/smollm2-stages.md); a model of the embedded demo's size (0.1M
# parameters) gains nothing and would only see its numbers change.
CPU_BF16_MIN_PARAMS = 20_000_000


def bf16_pays(model, device: torch.device | str) -> bool:
    """Run no-grad passes of ``model`` on ``device`` under bf16 autocast?"""
    d = torch.device(device)
    if not bf16_native(d):
        return False
    return d.type == "cuda" or sum(p.numel() for p in model.parameters()) >= CPU_BF16_MIN_PARAMS


def _special_id(tokenizer, name: str) -> int:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    if tid is None:
        raise ValueError(f"the tokenizer has no {name} token; generation needs <{name}>.")
    return int(tid)


@torch.no_grad()
def sample_continuations(
    model,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "generate",
    bf16: bool = True,
) -> list[list[int]]:
    """Sample one continuation per prefix; return the new token ids (EOS and after removed)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if device is None:
        device = next(model.parameters()).device
    pad, eos = _special_id(tokenizer, "pad"), _special_id(tokenizer, "eos")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and bf16_pays(model, dev))
    out: list[list[int]] = []
    starts = range(0, len(prefixes), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        rows = [list(p) for p in prefixes[s:s + batch_size]]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prefix is empty: prefixes must start with the BOS id.")
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last position is the latest token
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        # HF sampling draws from the global RNG: seed it per batch from our generator so
        # results do not depend on what ran before, and restore the caller's state after.
        state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        try:
            with autocast:
                seqs = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=1.0, pad_token_id=pad, eos_token_id=eos, use_cache=True,
                )
        finally:
            torch.random.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        for row in seqs[:, width:].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    model.train(was_training)
    return out


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def generate_texts(
    model,
    tokenizer,
    n: int,
    *,
    prompts: Sequence[str] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    **kw,
) -> tuple[list[str], list[str] | None]:
    """``n`` samples from ``model``: unconditioned from BOS, or one per prompt (cycled).

    Returns (responses, prompts used or None). ``prompt_ids`` (token ids starting with BOS)
    take precedence over ``prompts`` (strings, encoded here with the document start in
    front, as the pipeline's encoder writes its BOS).
    """
    bos = int(tokenizer.convert_tokens_to_ids(document_start(tokenizer)))
    used: list[str] | None = None
    if prompt_ids is None and prompts is not None and len(prompts) > 0:
        prompt_ids = [[bos] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        used = [prompts[i % len(prompts)] for i in range(n)]
    if prompt_ids is not None and len(prompt_ids) > 0:
        prefixes = [prompt_ids[i % len(prompt_ids)] for i in range(n)]
        if used is None:
            used = [decode(tokenizer, p) for p in prefixes]
    else:
        prefixes = [[bos]] * n
    new = sample_continuations(model, tokenizer, prefixes, seed=seed, **kw)
    return [decode(tokenizer, r) for r in new], used
