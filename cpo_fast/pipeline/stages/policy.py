"""Models a run loads, trains and saves: f_0 from disk, the policy made from it (LoRA
adapters or a full copy), its trainable tensors, and a trained policy back from disk.

Loading never runs code from the model directory (``trust_remote_code=False``) and reads
weights from safetensors only (``use_safetensors=True``; a directory holding only pickled
``.bin`` weights is refused).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.run.persist import WriteError, as_oserror, refuse_pickle
from cpo_fast.pretrained import is_packaged, model_dir


def lora_targets(model) -> list[str]:
    """Attention and MLP projections of Llama/Qwen2 (q,k,v,o,gate,up,down) or GPT-2."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gpt2 = ["c_attn", "c_proj", "c_fc"]
    found = [t for t in llama if t in names] or [t for t in gpt2 if t in names]
    if not found:
        raise ValueError(f"no known attention/MLP projection in {type(model).__name__}; "
                         "use --lora false (full fine-tuning).")
    return found


def load_causal_lm(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """A causal LM from a HF directory, a packaged name (``smollm2-135m``: converted once
    into the cache, cpo_fast/pretrained.py) or, where there is network, a hub id."""
    from transformers import AutoModelForCausalLM

    if is_packaged(path):
        path = model_dir(path)
    p = Path(path)
    if not p.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        try:  # a hub id (needs network)
            return AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="sdpa", trust_remote_code=False,
                use_safetensors=True).to(device)
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileNotFoundError(
                f"{path}: no such directory, and not loadable as a hub id ({first}); give a "
                "HF model directory or a packaged name (smollm2-135m).") from None
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json).")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weights (pickled .bin weights are not "
                         "loaded); re-save the model with save_pretrained(safe_serialization=True).")
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False,
            use_safetensors=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load the model ({type(e).__name__}: {first}); its "
                         "files are damaged or from another model: delete the directory to "
                         "rebuild it, or restore it.") from None
    return model.to(device)


def load_policy(f0_dir: str | Path, model_dir: str | Path, device: torch.device):
    """A trained policy: a peft adapter on f_0, or a full model directory."""
    md = Path(model_dir)
    if (md / "adapter_config.json").is_file():
        from peft import PeftModel

        if not (md / "adapter_model.safetensors").is_file():
            refuse_pickle(md)
            raise FileNotFoundError(f"--model-dir {str(md)!r}: no adapter_model.safetensors.")
        return PeftModel.from_pretrained(load_causal_lm(f0_dir, device), md)
    if (md / "config.json").is_file():
        return load_causal_lm(md, device)
    raise FileNotFoundError(f"--model-dir {str(md)!r}: no adapter_config.json or config.json "
                            "there; train first (cpo-fast train) or point to a model directory.")


def make_policy(f0, cfg: RunConfig):
    """The policy starts at f_0: LoRA adapters on its projections, or a full copy."""
    model = copy.deepcopy(f0)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(model), task_type="CAUSAL_LM",
                          fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
        with torch.random.fork_rng(devices=[]):  # adapter init must not shift the run's RNG
            torch.manual_seed(cfg.seed + 1)
            model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks (e.g. {missing[0]}): "
                         "was it written by a run with another --lora / model setting?")
    wrong = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in state.items()
             if t.shape != params[n].shape]
    if wrong:
        n, got, want = wrong[0]
        raise ValueError(f"checkpoint parameter {n} has shape {got}, the model's is {want}: it "
                         "was written for another model size (--hidden-size, --num-layers, "
                         "--lora-r, ...); use the same settings or another --output-dir.")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_model(model, tokenizer, path: str | Path) -> None:
    """save_pretrained (safetensors): the adapter for LoRA (load on f_0 with peft), else the
    full model, and the tokenizer next to it."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)  # safetensors (the only format of transformers 5)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    except (OSError, SafetensorError) as e:  # a full disk surfaces as SafetensorError
        err = as_oserror(e)
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}.") from e
