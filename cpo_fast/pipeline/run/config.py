"""Run configuration: one flat dataclass, filled from defaults, then YAML, then CLI flags.

A YAML file may be flat (``lr: 1e-3``) or grouped in sections (``train: {lr: 1e-3}``); the
sections are only for reading and are flattened (section names: see ``SECTIONS``). Every
field is also a CLI flag ``--field-name`` (underscores become dashes); flags override YAML.
Unknown keys are errors that name the key and the closest valid one.

Each field declares here, once, what it pins (``pins=`` in its metadata):

- ``PREPARE``: the field decides the shared stages cached in an output directory (the
  tokenizer, f_0, the reference cache); ``prepare.json`` records them and a later command
  with other values is refused (see :func:`pinned`).
- ``RESUME``: the field changes what the training loop computes; ``--resume`` refuses a
  checkpoint written with other values. Every other field may change on ``--resume``.
- ``local=True``: a setting of one invocation (``--stop-after``, ``--device``, ...), never
  taken from the settings saved in an output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cpo_fast.constants import ESS_TARGET, WEIGHTINGS
from cpo_fast.distributed import current_world
from cpo_fast.objectives import METHODS, Objective
from cpo_fast.pipeline.run.persist import write_json

DM_SOURCES = ("f0_completions", "dataset", "file")
ARCHS = ("llama", "qwen2", "gpt2")
PREPARE, RESUME, BOTH = ("prepare",), ("resume",), ("prepare", "resume")


def _f(default: Any, help: str, section: str, **kw) -> Any:
    meta = {"help": help, "section": section, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything a run needs. Sections are documentation (and YAML grouping) only."""

    # --- data
    data: str | None = _f(None, "dataset file (csv, jsonl, parquet)", "data", pins=PREPARE)
    text_column: str = _f("text", "column with the texts", "data", pins=PREPARE)
    outcome_column: str = _f("outcome", "column with the outcome y", "data")
    prompt_column: str | None = _f(None, "optional prompt column (only responses scored)", "data",
                                   pins=PREPARE)
    log_propensity_column: str | None = _f(None, "optional known log P^R column", "data")
    group_column: str | None = _f(None, "optional group column (kept for analysis)", "data")
    id_column: str | None = _f(None, "optional id column", "data")
    max_tokens: int = _f(64, "max tokens per text (prompt + response)", "data", pins=PREPARE)
    on_too_long: str = _f("truncate", "truncate | error", "data", pins=PREPARE)
    max_rows: int | None = _f(None, "subsample the dataset to this many rows (seeded)", "data", pins=PREPARE)
    eval_fraction: float = _f(0.1, "held-out rows for the off-policy estimates", "data", pins=PREPARE)
    higher_is_better: bool = _f(True, "false when lower outcomes are better", "data", pins=RESUME)
    # --- models
    base_model: str | None = _f(None, "HF model dir to start f_0's SFT from (else a new model)",
                                "model", pins=PREPARE)
    f0_model: str | None = _f(None, "HF model dir used as f_0 directly (skips the SFT stage)",
                              "model", pins=PREPARE)
    tokenizer: str | None = _f(None, "tokenizer dir (else the model's, else trained here)", "model",
                               pins=PREPARE)
    vocab_size: int = _f(512, "vocabulary of a tokenizer trained here", "model", pins=PREPARE)
    arch: str = _f("llama", "architecture of a new model: llama | qwen2 | gpt2", "model", pins=PREPARE)
    hidden_size: int = _f(64, "new model: hidden size", "model", pins=PREPARE)
    num_layers: int = _f(2, "new model: layers", "model", pins=PREPARE)
    num_heads: int = _f(4, "new model: attention heads", "model", pins=PREPARE)
    # --- f_0 (SFT on all the dataset's texts)
    f0_steps: int = _f(200, "SFT steps for f_0", "f0", pins=PREPARE)
    f0_lr: float | None = _f(None, "SFT learning rate for f_0 (default: 3e-3 for a new model; "
                             "5e-4 LoRA / 3e-5 full for a --base-model)", "f0", pins=PREPARE)
    f0_lora: bool | None = _f(None, "LoRA for f_0's SFT (default: true for a --base-model, "
                              "false for a new model)", "f0", pins=PREPARE)
    f0_batch_size: int = _f(32, "SFT batch size for f_0", "f0", pins=PREPARE)
    # --- policy training
    method: str = _f("dr_cpo", "sft_all | sft_top | oo_rlhf | cpo | dr_cpo", "train", pins=RESUME)
    weighting: str = _f("self_normalized", "raw | self_normalized | clipped | truncated", "train",
                        pins=RESUME)
    steps: int = _f(100, "optimizer steps", "train", pins=RESUME)
    batch_size: int = _f(32, "rows per micro-batch", "train", pins=RESUME)
    grad_accum: int = _f(1, "micro-batches per optimizer step", "train", pins=RESUME)
    lr: float = _f(1e-3, "peak learning rate (AdamW)", "train", pins=RESUME)
    weight_decay: float = _f(0.0, "AdamW weight decay", "train", pins=RESUME)
    warmup_steps: int = _f(10, "linear warmup steps (then cosine decay to 10%)", "train", pins=RESUME)
    grad_clip: float = _f(1.0, "max gradient norm (0 disables)", "train", pins=RESUME)
    lora: bool = _f(True, "LoRA adapters (false: full fine-tuning)", "train", pins=RESUME)
    lora_r: int = _f(8, "LoRA rank", "train", pins=RESUME)
    lora_alpha: float = _f(16.0, "LoRA alpha", "train", pins=RESUME)
    lora_dropout: float = _f(0.0, "LoRA dropout", "train", pins=RESUME)
    bf16: bool = _f(True, "bf16 autocast where it pays: a GPU, or a CPU with native bf16 "
                          "(AVX512-BF16/AMX) and a model of >= 20M parameters; f_0's cached "
                          "log-probs use the same precision", "train")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward", "train")
    length_normalize: bool = _f(False, "mean instead of sum of token log-probs", "train", pins=RESUME)
    entropy_coef: float = _f(0.0, "entropy bonus coefficient", "train", pins=RESUME)
    kl_coef: float = _f(0.0, "KL-to-f_0 penalty coefficient (k3, from the cache)", "train", pins=RESUME)
    max_log_weight: float = _f(50.0, "clamp on log weights (raw/clipped/truncated)", "train", pins=RESUME)
    truncation: float = _f(10.0, "tau for weighting=truncated", "train", pins=RESUME)
    clip_eps: float = _f(0.2, "eps for weighting=clipped", "train", pins=RESUME)
    top_quantile: float = _f(0.75, "sft_top trains on rows above this outcome quantile", "train", pins=RESUME)
    dm_batch_size: int = _f(32, "DM rows per micro-batch (dr_cpo, oo_rlhf)", "train", pins=RESUME)
    backend: str | None = _f(None, "fused-op backend (default: best available)", "train")
    save_every: int = _f(50, "checkpoint every N optimizer steps (0: only at the end)", "train")
    log_every: int = _f(1, "metrics line every N steps", "train")
    stop_after: int | None = _f(None, "stop after this step (simulates an interruption)", "train", local=True)
    # issue 11: the weight-collapse guard (pipeline/training/guard.py, docs/validity.md)
    ess_guard: float = _f(0.1, "warn when the outcome or DM ESS, as a share of its batch, "
                          "falls below this (0: off)", "train")
    stop_on_collapse: bool = _f(False, "stop training when the ESS guard fires", "train")
    log_weight_cap: float = _f(0.0, "cap each row's log weight to the batch median +- this "
                               "(0: off; cpo_fast.estimators.cap_log_weights)", "train", pins=RESUME)
    ess_target: float = _f(ESS_TARGET, "temper the log weights so the outcome and DM ESS each "
                           "stay at this share of the effective batch (0: off; "
                           "cpo_fast.estimators.temper_log_weights)", "train", pins=RESUME)
    # --- outcome model
    outcome_model: str = _f("ridge", "ridge | mlp on f_0's mean-pooled features", "outcome")
    outcome_folds: int = _f(5, "cross-fitting folds", "outcome")
    outcome_features: str = _f("f0", "f0 (f_0's mean-pooled hidden states) | tokens (bag of "
                               "token counts) | both", "outcome")
    # --- direct-method (DM) set
    dm_source: str = _f("f0_completions", "f0_completions | dataset | file", "dm")
    dm_path: str | None = _f(None, "unlabeled texts file for dm_source=file", "dm")
    dm_size: int = _f(512, "DM texts (f0_completions: how many to sample)", "dm")
    dm_prefix_fraction: float = _f(0.3, "f0_completions: kept fraction of each text's tokens",
                                   "dm")
    # --- generation / evaluation
    num_samples: int = _f(256, "texts generated per model for evaluation", "generate")
    max_new_tokens: int = _f(48, "max new tokens per generated text", "generate")
    temperature: float = _f(1.0, "sampling temperature", "generate")
    top_k: int = _f(0, "top-k sampling (0: full distribution)", "generate")
    gen_from_prompts: bool = _f(True, "condition on the dataset's prompts when it has them",
                                "generate")
    bootstrap: int = _f(1000, "bootstrap resamples for the 95% intervals", "generate")
    scorer: str | None = _f(None, "extra scorer of generations, 'module:function' taking a "
                            "list of texts (e.g. cpo_fast.pipeline.stages.synthetic:oracle)", "generate")
    # --- run
    output_dir: str = _f("runs/train", "where everything is written", "run", local=True)
    seed: int = _f(0, "seed for data order, init, sampling", "run", pins=BOTH)
    device: str | None = _f(None, "cpu | cuda (default: cuda when available)", "run", local=True)
    batch_size_eval: int = _f(64, "batch size of no-grad passes", "run")
    progress: bool = _f(True, "tqdm progress bars", "run", local=True)
    threads: int | None = _f(None, "torch CPU threads", "run", local=True)

    def validate(self) -> RunConfig:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{flag(name)}={v!r} is not one of {allowed}.{hint}")

        one_of("method", tuple(METHODS))
        one_of("weighting", WEIGHTINGS)
        one_of("dm_source", DM_SOURCES)
        one_of("arch", ARCHS)
        one_of("on_too_long", ("truncate", "error"))
        one_of("outcome_model", ("ridge", "mlp"))
        one_of("outcome_features", ("f0", "tokens", "both"))
        if self.dm_source == "file" and not self.dm_path:
            raise ValueError("--dm-source=file needs --dm-path pointing to a file of texts.")
        for name in ("steps", "batch_size", "grad_accum", "max_tokens", "dm_batch_size",
                     "num_samples", "max_new_tokens", "outcome_folds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}.")
        if not 0.0 < self.dm_prefix_fraction < 1.0:
            raise ValueError("--dm-prefix-fraction must be in (0, 1), got "
                             f"{self.dm_prefix_fraction}.")
        self._check_ranges()
        return self

    # (field, lowest allowed, whether the lowest itself is allowed): every number whose
    # wrong sign would otherwise surface minutes later, deep in torch or numpy.
    _RANGES = (("lr", 0.0, False), ("f0_lr", 0.0, False), ("weight_decay", 0.0, True),
               ("grad_clip", 0.0, True), ("clip_eps", 0.0, False), ("truncation", 0.0, False),
               ("max_log_weight", 0.0, False), ("temperature", 0.0, False),
               ("log_weight_cap", 0.0, True), ("entropy_coef", 0.0, True),
               ("kl_coef", 0.0, True), ("lora_r", 1, True), ("lora_alpha", 0.0, False),
               ("warmup_steps", 0, True), ("save_every", 0, True), ("log_every", 1, True),
               ("f0_steps", 0, True), ("f0_batch_size", 1, True), ("dm_size", 1, True),
               ("batch_size_eval", 1, True), ("bootstrap", 1, True), ("top_k", 0, True),
               ("outcome_folds", 2, True), ("vocab_size", 8, True), ("hidden_size", 1, True),
               ("num_layers", 1, True), ("num_heads", 1, True), ("ess_guard", 0.0, True),
               ("ess_target", 0.0, True))

    def _check_ranges(self) -> None:
        for name, low, inclusive in self._RANGES:
            v = getattr(self, name)
            if v is None:  # unset: chosen later (f0_lr: by the starting point)
                continue
            ok = math.isfinite(v) and (v >= low if inclusive else v > low)
            if not ok:
                rel = ">=" if inclusive else ">"
                raise ValueError(f"{flag(name)} must be {rel} {low}, got {v}.")
        if self.clip_eps >= 1.0:
            raise ValueError(f"--clip-eps must be < 1 (the trust region is [1 - eps, 1 + eps]), "
                             f"got {self.clip_eps}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if not 0.0 < self.top_quantile < 1.0:
            raise ValueError(f"--top-quantile must be in (0, 1), got {self.top_quantile}.")
        if self.ess_target > 1.0:
            raise ValueError(f"--ess-target is a share of the batch in [0, 1], got {self.ess_target}.")
        if self.ess_guard >= 1.0:
            raise ValueError(f"--ess-guard is a share of the batch in [0, 1), got {self.ess_guard}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}.")
        if self.max_rows is not None and self.max_rows < 2:
            raise ValueError(f"--max-rows must be >= 2, got {self.max_rows}.")

    def objective(self) -> Objective:
        """The loss these settings train (cpo_fast.objectives.Objective); the regularizers
        run over the DM rows when the method has them."""
        return Objective(self.method, weighting=self.weighting,
                         higher_is_better=self.higher_is_better,
                         length_normalize=self.length_normalize, entropy_coef=self.entropy_coef,
                         kl_coef=self.kl_coef, regularize_on="dm",
                         log_weight_cap=self.log_weight_cap, max_log_weight=self.max_log_weight,
                         truncation=self.truncation, clip_eps=self.clip_eps,
                         ess_target=self.ess_target)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the settings as JSON (on rank 0 only, under torchrun / accelerate)."""
        if current_world().is_main:
            write_json(path, self.to_dict())


FIELDS = {f.name: f for f in fields(RunConfig)}
SECTIONS = sorted({f.metadata["section"] for f in fields(RunConfig)})


def pinned(kind: str) -> tuple[str, ...]:
    """Names of the fields declared with ``pins`` containing ``kind`` ("prepare"/"resume")."""
    return tuple(f.name for f in fields(RunConfig) if kind in f.metadata.get("pins", ()))


def pinned_values(cfg: RunConfig, kind: str) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in pinned(kind)}


def flag(name: str) -> str:
    """The CLI flag of a field: ``text_column`` -> ``--text-column``."""
    return "--" + name.replace("_", "-")


def saved_settings(path: str | Path) -> dict[str, Any]:
    """The settings saved by an earlier command (``config.json``), minus the ``local`` ones
    and keys this version does not know; {} when there is no such file."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: unreadable saved settings ({e}); delete it or fix it.") from None
    return {k: v for k, v in raw.items() if k in FIELDS and not FIELDS[k].metadata.get("local")}


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key in SECTIONS and isinstance(v, dict):  # no field takes a mapping
            flat.update(_flatten(v, source))
            continue
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{source}: unknown config key {k!r}.{hint}")
        flat[key] = v
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        why = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"--config {str(path)!r}: not valid YAML{at}: {why}.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {str(path)!r}: expected a mapping of keys to values.")
    return _flatten(raw, str(path))


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _caster(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return _parse_bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Add ``--config`` and one ``--field-name`` flag per field (default: unset)."""
    parser.add_argument("--config", default=None, help="YAML config file (flags override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        sec = f.metadata["section"]
        g = groups.setdefault(sec, parser.add_argument_group(sec))
        text = f.metadata["help"]
        if "default" not in text:  # a help text that explains its default keeps it
            text += f" (default: {f.default!r})"
        g.add_argument(flag(f.name), dest=f.name, type=_caster(f),
                       default=None, help=text.replace("%", "%%"))  # argparse formats help


def config_from(args: argparse.Namespace | None = None, yaml_path: str | None = None,
                base: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Defaults < ``base`` (settings saved in the output dir) < YAML < parsed flags (those
    not None) < keyword overrides."""
    values: dict[str, Any] = dict(base or {})
    path = yaml_path or (getattr(args, "config", None) if args is not None else None)
    if path:
        values.update(load_yaml(path))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    values.update(_flatten(overrides, "overrides"))
    cfg = RunConfig(**values)
    for name, f in FIELDS.items():  # YAML gives strings for '1e-3'; coerce numeric fields
        v = getattr(cfg, name)
        if isinstance(v, str) and _caster(f) in (int, float, _parse_bool):
            try:
                setattr(cfg, name, _caster(f)(v))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ValueError(f"config key {name!r}: cannot read {v!r} ({e}).") from None
    return cfg.validate()
