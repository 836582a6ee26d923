"""The head transform: one frozen value object from the public ops to every backend.

A head transform replaces each raw logit ``z`` before the softmax by

    z' = (softcap * tanh(logit_scale * z / softcap) if softcap else logit_scale * z) / temperature

(the order of Hugging Face models and TRL: scale, cap, divide by the temperature).
:class:`HeadTransform` holds its three numbers. The public ops build it once from their
``transform=`` or ``temperature=``/``softcap=``/``logit_scale=`` arguments
(:meth:`HeadTransform.of`, validated by ``cpo_fast._checks.check_head_transform``);
``cpo_fast.causal_lm_token_logprobs`` reads it from the model's config
(:meth:`HeadTransform.from_model`). It reaches every backend as that same value (or None for
the identity); the only place it is taken apart is the ``torch.library`` custom-op schema,
which carries scalars only (:func:`schema_scalars` outside the op, :func:`from_schema`
inside). What a backend's kernels need from it is derived inside the backend, at the launch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Config fields that change the head's output in a way not expressed by HeadTransform.
_UNSUPPORTED_HEAD_FIELDS = {
    "mup_width_multiplier": "Phi-3-small's muP logit scaling",
    "dim_model_base": "MiniCPM's hidden-state scaling before the head",
}


@dataclasses.dataclass(frozen=True)
class HeadTransform:
    """The logit transform of the output head, applied before the softmax (HF / TRL order):
    ``z' = (softcap * tanh(logit_scale * z / softcap) if softcap else logit_scale * z) /
    temperature``. The one form of it from the public ops (``transform=``, or built from
    their ``temperature=``/``softcap=``/``logit_scale=``) and from
    :meth:`from_model` down to every backend."""

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.softcap is None and self.logit_scale == 1.0

    @property
    def grad_scale(self) -> float:
        """d z' / d u at a zero tanh argument, times d u / d z: logit_scale / temperature."""
        return float(self.logit_scale) / float(self.temperature)

    @classmethod
    def of(cls, transform: HeadTransform | None = None, temperature: float = 1.0,
           softcap: float | None = None, logit_scale: float = 1.0) -> HeadTransform:
        """An op's arguments as one value: ``transform``, or else the three scalars (not both)."""
        if transform is None:
            return cls(temperature, softcap, logit_scale)
        if not isinstance(transform, HeadTransform):
            raise TypeError(f"transform must be a cpo_fast.HeadTransform or None, got "
                            f"{type(transform).__name__}.")
        if (temperature, softcap, logit_scale) != (1.0, None, 1.0):
            raise ValueError("pass the head transform either as transform= or as temperature=, "
                             "softcap=, logit_scale=, not both.")
        return transform

    @classmethod
    def from_model(cls, model_or_config: Any, temperature: float = 1.0) -> HeadTransform:
        """The transform a Hugging Face model's forward applies to its logits, read from its
        (text) config (cpo_fast/models.py lists the fields), with the sampler's
        ``temperature``."""
        cfg = _text_config(model_or_config)
        for field, what in _UNSUPPORTED_HEAD_FIELDS.items():
            value = getattr(cfg, field, None)
            if value not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"config.{field} = {value!r} ({what}) transforms the logits in a way "
                    "cpo_fast's fused head does not model; compute log-probs from the model's "
                    "logits instead (cpo_fast.token_logprobs(model(...).logits[:, :-1], "
                    "labels))."
                )
        softcap = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        if scale == "inv_sqrt_d_model":  # MPT
            scale = 1.0 / math.sqrt(cfg.d_model)
        for field in ("output_multiplier", "lm_head_multiplier"):
            if scale is None:
                scale = getattr(cfg, field, None)
        logits_scaling = getattr(cfg, "logits_scaling", None)
        if scale is None and logits_scaling is not None:
            hyperclova = getattr(cfg, "model_type", "") == "hyperclovax"
            scale = logits_scaling if hyperclova else 1.0 / logits_scaling
        if scale is not None and not isinstance(scale, (int, float)):
            raise NotImplementedError(f"unsupported logit scale {scale!r} in the model config.")
        return cls(temperature=temperature, softcap=None if softcap is None else float(softcap),
                   logit_scale=1.0 if scale is None else float(scale))


def _text_config(model_or_config: Any) -> Any:
    """The text config of a model (through peft's get_base_model) or of a config."""
    get_base = getattr(model_or_config, "get_base_model", None)
    model = get_base() if callable(get_base) else model_or_config
    cfg = getattr(model, "config", model)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def active(transform: HeadTransform | None) -> HeadTransform | None:
    """``transform`` unless it is None or the identity (a backend's one test; the ops pass
    None for the identity)."""
    return None if transform is None or transform.is_identity else transform


def schema_scalars(transform: HeadTransform | None) -> tuple[float, float | None, float]:
    """``(temperature, softcap, logit_scale)`` of ``transform`` (None: the identity), for the
    ``torch.library`` custom-op schema, which carries scalars only. The ops unpack the
    transform with this at that one boundary and rebuild it inside the op with
    :func:`from_schema`."""
    t = transform or HeadTransform()
    return (float(t.temperature), None if t.softcap is None else float(t.softcap),
            float(t.logit_scale))


def from_schema(temperature: float, softcap: float | None,
                logit_scale: float) -> HeadTransform | None:
    """The transform a backend receives, rebuilt from the custom op's scalars (None: none)."""
    return active(HeadTransform(temperature, softcap, logit_scale))
