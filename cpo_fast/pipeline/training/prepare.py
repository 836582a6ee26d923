"""The shared stages, built once per output directory (and reloaded from it), in order:

    data        load and validate the file, subsample, split off the held-out rows
    tokenizer   given (--tokenizer / the model's) or trained here, then encode every row
    f0          f_0 = SFT of the base (or a new) model on the training texts (loop.train)
    precompute  f_0's per-token log-probs of every row, cached (no reference model is in
                memory while a policy trains)
    outcome     ghat, cross-fitted on f_0's features (out-of-fold predictions)
    dm          the DM set of DR-CPO / OO-RLHF, its reference log-probs and ghat

``prepare(cfg, until=...)`` stops after a stage (the CLI's `precompute` and `fit-outcome`).
The settings a cached tokenizer/f_0 depends on are the config fields declared with
``pins=PREPARE`` (config.py); ``prepare.json`` records them and other values are refused.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpo_fast.objectives import method_of
from cpo_fast.pipeline.run.config import RunConfig, pinned_values
from cpo_fast.pipeline.run.layout import RunLayout
from cpo_fast.pipeline.run.persist import WriteError, read_json, write_json
from cpo_fast.pipeline.run.preflight import check_outcomes, check_rows
from cpo_fast.pipeline.run.runtime import is_main, main_first, pick_device, seed_everything
from cpo_fast.pipeline.stages.data import DataConfig, Encoded, OutcomeTable, encode, load_table
from cpo_fast.pipeline.stages.dm import build_dm_set, load_dm_set, save_dm_set
from cpo_fast.pipeline.stages.modeling import build_model
from cpo_fast.pipeline.stages.outcome import bag_of_words_features, fit_outcome_model, mean_pooled_features
from cpo_fast.pipeline.stages.policy import load_causal_lm, make_policy, save_model
from cpo_fast.pipeline.stages.precompute import precompute_ref_logprobs
from cpo_fast.pipeline.stages.support import support_report
from cpo_fast.pipeline.stages.tokenizer import for_documents, train_tokenizer
from cpo_fast.pipeline.training.loop import TrainData, autocast_args, train
from cpo_fast.pretrained import is_packaged, model_dir

STAGES = ("f0", "precompute", "outcome", "all")


@dataclass
class Prepared:
    """Everything the methods share, built once per output dir (and reloaded from it)."""

    cfg: RunConfig
    device: torch.device
    out: Path
    tokenizer: Any
    train_table: OutcomeTable
    eval_table: OutcomeTable | None
    train_enc: Encoded
    eval_enc: Encoded | None
    train_ref: list[np.ndarray]
    eval_ref: list[np.ndarray] | None
    f0_dir: Path
    f0: Any = None
    outcome_fit: Any = None
    ghat_train: np.ndarray | None = None
    ghat_eval: np.ndarray | None = None
    dm: Any = None
    dm_ref: list[np.ndarray] | None = None
    dm_ghat: np.ndarray | None = None
    dm_support: dict | None = None  # DM texts outside ghat's support (docs/validity.md)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def is_main(self) -> bool:
        """False on the ranks other than 0 of a torchrun / accelerate run (they write nothing)."""
        return is_main()

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out)

    def load_f0(self):
        if self.f0 is None:
            self.f0 = load_causal_lm(self.f0_dir, self.device)
            self.f0.requires_grad_(False)
        return self.f0


def prepare(cfg: RunConfig, *, need_dm: bool | None = None, resume: bool = False,
            table: tuple[OutcomeTable, OutcomeTable | None] | None = None,
            until: str = "all", save_config: bool = True) -> Prepared:
    """Build or reload the shared stages under ``cfg.output_dir``, up to ``until``.

    ``need_dm``: build the DM set (default: when ``cfg.method`` uses it). ``table``: an
    already loaded (train, eval) split instead of ``cfg.data``. ``resume``: continue an
    interrupted f_0 SFT from its checkpoint. ``save_config=False``: leave the run's
    config.json as it is (commands that only read a run).
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r} is not one of {STAGES}.")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown ours
    lay = RunLayout(cfg.output_dir)
    if table is None:
        check_cached_settings(cfg, lay)
    device = pick_device(cfg)  # under torchrun / accelerate: joins the process group
    seed_everything(cfg.seed)
    # Several ranks: rank 0 builds (or reloads) the stages while the others wait, then they
    # reload what it wrote; only rank 0 writes files.
    with main_first("the shared stages (f_0, reference cache, ghat, DM set)"):
        return _stages(cfg, lay, device, table, resume=resume, until=until,
                       need_dm=method_of(cfg.method).dm_rows if need_dm is None else need_dm,
                       save_config=save_config)


def _stages(cfg: RunConfig, lay: RunLayout, device, table, *, resume: bool, until: str,
            need_dm: bool, save_config: bool) -> Prepared:
    prep = prepare_data(cfg, lay, device, table, resume=resume, save_config=save_config)
    if table is None:
        check_cached_settings(cfg, lay, record=True)
    f0 = prep.load_f0()
    f0.eval()
    if until == "f0":
        return prep
    prep.train_ref = ref_logprobs(prep, prep.train_enc, "train")
    if prep.eval_enc is not None:
        prep.eval_ref = ref_logprobs(prep, prep.eval_enc, "eval")
    if until == "precompute":
        return prep
    fit_outcome(prep)
    if until == "outcome":
        return prep
    if need_dm:
        build_dm(prep)
    return prep


def prepare_data(cfg: RunConfig, lay: RunLayout, device, table, *, resume: bool,
                 save_config: bool = True) -> Prepared:
    """Stages data, tokenizer and f0. The output directory is created (and the settings
    saved in it) only once the data is known good: bad input leaves nothing behind."""
    train_t, eval_t = table if table is not None else load_split(cfg)
    check_rows(cfg, len(train_t))
    check_outcomes(cfg, train_t.outcomes)
    try:
        lay.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(e.errno, f"--output-dir {str(lay.root)!r}: cannot create it "
                         f"({e.strerror}); choose a writable directory.") from None
    # the settings, and which of the paper's two options f_0 is, stated next to them;
    # generate / evaluate only read a run's settings: they never rewrite them
    if save_config and is_main():
        write_json(lay.config, {**cfg.to_dict(), "f0": f0_record(cfg)})
    texts = list(train_t.texts) + (list(train_t.prompts) if train_t.prompts else [])
    tok = get_tokenizer(cfg, texts, lay)
    train_enc = encode(train_t, tok, cfg.max_tokens, cfg.on_too_long)
    eval_enc = encode(eval_t, tok, cfg.max_tokens, cfg.on_too_long) if eval_t is not None else None
    if train_enc.n_truncated:
        print(f"note: {train_enc.n_truncated} of {len(train_enc)} training rows were cut to "
              f"--max-tokens={cfg.max_tokens}.")
    prep = Prepared(cfg, device, lay.root, tok, train_t, eval_t, train_enc, eval_enc, [], None,
                    Path(model_source(cfg.f0_model)) if cfg.f0_model else lay.f0 / "model")
    if not cfg.f0_model:
        fit_f0(prep, resume=resume)
    return prep


def model_source(name: str | None) -> str | None:
    """A packaged model name (``smollm2-135m``) -> its converted directory (made on first
    use, cpo_fast/pretrained.py); anything else as it is."""
    return str(model_dir(name)) if is_packaged(name) else name


def _hub_id(name: str | Path) -> bool:
    """``org/model``, not a local path: the model (and its tokenizer) come from the hub."""
    s = str(name)
    return not Path(s).exists() and s.count("/") == 1 and not s.startswith((".", "/", "~"))


def f0_record(cfg: RunConfig) -> dict[str, Any]:
    """Which of the paper's two options f_0 is, with the settings that made it: the
    pretrained model itself (``--f0-model``), or SFT on the training texts of a pretrained
    (``--base-model``) or new model."""
    if cfg.f0_model:
        return {"option": "pretrained", "model": cfg.f0_model,
                "note": "f_0 is the given model itself (no SFT)"}
    lora, lr = f0_training(cfg)
    return {"option": "sft", "base": cfg.base_model or f"new {cfg.arch} model",
            "lora": lora, "lr": lr, "steps": cfg.f0_steps, "batch_size": cfg.f0_batch_size,
            "note": "f_0 is SFT of the base model on the training texts"}


def f0_training(cfg: RunConfig) -> tuple[bool, float]:
    """(LoRA?, learning rate) of f_0's SFT. Unset, they follow the starting point: a new
    model is trained fully at 3e-3; a pretrained one gets LoRA at 5e-4 (full fine-tuning
    of a pretrained model: 3e-5), rates that adapt it without erasing what it knows."""
    lora = cfg.f0_lora if cfg.f0_lora is not None else bool(cfg.base_model)
    if cfg.f0_lr is not None:
        return lora, float(cfg.f0_lr)
    if not cfg.base_model:
        return lora, 3e-3
    return lora, 5e-4 if lora else 3e-5


def check_cached_settings(cfg: RunConfig, lay: RunLayout, *, record: bool = False) -> None:
    """Refuse to reuse a tokenizer / f_0 cached under other settings (stale results);
    ``record=True`` (once f_0 exists) writes the settings down."""
    now = pinned_values(cfg, "prepare")
    if lay.prepare.is_file():
        before = read_json(lay.prepare)
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff:
            raise ValueError(f"--output-dir {str(lay.root)!r} holds a tokenizer/f_0 built with "
                             f"other settings {diff} (then, now); use another --output-dir or "
                             "the same settings.")
    elif record and is_main():
        write_json(lay.prepare, now)


def data_config(cfg: RunConfig) -> DataConfig:
    if not cfg.data:
        raise ValueError("--data is required: a CSV, JSONL or Parquet file of texts and outcomes.")
    return DataConfig(path=cfg.data, text_column=cfg.text_column,
                      outcome_column=cfg.outcome_column, prompt_column=cfg.prompt_column,
                      log_propensity_column=cfg.log_propensity_column,
                      group_column=cfg.group_column, id_column=cfg.id_column,
                      max_tokens=cfg.max_tokens, on_too_long=cfg.on_too_long)


def load_split(cfg: RunConfig) -> tuple[OutcomeTable, OutcomeTable | None]:
    """Load, subsample (``max_rows``) and split off ``eval_fraction`` held-out rows (seeded)."""
    table = load_table(data_config(cfg), require_outcome=True)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_rows and len(table) > cfg.max_rows:
        table = table.subset(np.sort(rng.choice(len(table), cfg.max_rows, replace=False)))
    return split_held_out(table, cfg.eval_fraction, rng)


def split_held_out(table: OutcomeTable, fraction: float,
                   rng: np.random.Generator) -> tuple[OutcomeTable, OutcomeTable | None]:
    """(training rows, held-out rows): a ``fraction`` of the rows drawn with ``rng``."""
    n_eval = int(round(fraction * len(table)))
    if n_eval == 0:
        return table, None
    perm = rng.permutation(len(table))
    return table.subset(np.sort(perm[n_eval:])), table.subset(np.sort(perm[:n_eval]))


def get_tokenizer(cfg: RunConfig, texts: list[str], lay: RunLayout):
    from transformers import AutoTokenizer

    for src in (cfg.tokenizer, model_source(cfg.f0_model), model_source(cfg.base_model),
                lay.tokenizer):
        if src and ((Path(src) / "tokenizer_config.json").is_file() or _hub_id(src)):
            try:
                tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
            except OSError as e:  # a hub id without network, or a mistyped directory
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FileNotFoundError(
                    f"{src}: no such directory, and not loadable as a hub id ({first}); give "
                    "a HF model directory or a packaged name (smollm2-135m).") from None
            # BOS/EOS at document boundaries (SmolLM2's BOS is a chat marker); no chat template
            for_documents(tok)
            break
    else:
        tok = train_tokenizer(texts, cfg.vocab_size, model_max_length=cfg.max_tokens)
        tok.save_pretrained(lay.tokenizer)
    tok.model_max_length = int(1e9)  # encode() truncates; silence HF's length warning
    if tok.pad_token_id is None:  # HF models often ship without a pad token
        tok.pad_token = tok.eos_token
    for name in ("bos", "eos"):
        if getattr(tok, f"{name}_token_id") is None:
            raise ValueError(f"tokenizer {cfg.tokenizer or cfg.f0_model or cfg.base_model} has "
                             f"no {name} token; set one in its tokenizer_config.json.")
    return tok


def fit_f0(prep: Prepared, *, resume: bool) -> Path:
    """f_0 = SFT of the base model (or a new ``arch`` model) on the training texts. The SFT
    loop needs no reference log-probs: zeros stand in for the cache."""
    cfg, tok, lay = prep.cfg, prep.tokenizer, prep.layout
    if (lay.f0 / "model" / "config.json").is_file():
        return lay.f0 / "model"
    lora, lr = f0_training(cfg)
    if cfg.base_model:
        base = load_causal_lm(cfg.base_model, prep.device)
    else:
        base = build_model(cfg.arch, len(tok), hidden_size=cfg.hidden_size,
                           num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           max_positions=max(cfg.max_tokens, cfg.max_new_tokens + 8) + 8,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, seed=cfg.seed, device=prep.device)
    sft_cfg = dataclasses.replace(cfg, method="sft_all", lora=lora, lr=lr,
                                  steps=cfg.f0_steps, batch_size=cfg.f0_batch_size, grad_accum=1,
                                  entropy_coef=0.0, kl_coef=0.0, stop_after=None,
                                  warmup_steps=min(cfg.warmup_steps, cfg.f0_steps // 10))
    zeros = [np.zeros(len(r) - 1, np.float32) for r in prep.train_enc.input_ids]
    data = TrainData(enc=prep.train_enc, rows=np.arange(len(prep.train_enc)), ref=zeros)
    if lora:
        base = make_policy(base, sft_cfg)  # LoRA adapters on f_0's base (a copy)
    train(base, data, sft_cfg, lay.f0, pad_id=tok.pad_token_id, resume=resume, desc="f_0 SFT",
          tokenizer=tok, distributed=False)  # rank 0 alone (prepare's main_first)
    if lora:  # f_0 is a plain model: the adapters merged into the base weights
        tmp, dest = lay.f0 / "model.merged", lay.f0 / "model"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(base.merge_and_unload(), tok, tmp)
        shutil.rmtree(dest, ignore_errors=True)  # the adapter the loop saved
        tmp.rename(dest)  # config.json appears with the complete model only
    return lay.f0 / "model"


def ref_logprobs(prep: Prepared, enc: Encoded, key: str) -> list[np.ndarray]:
    """Stage precompute: f_0's per-token log-probs of ``enc``, from the cache when it has them."""
    cfg, f0 = prep.cfg, prep.load_f0()
    return precompute_ref_logprobs(f0, enc, cache_dir=prep.layout.cache,
                                   data_key=key, batch_size=cfg.batch_size_eval,
                                   device=prep.device, backend=cfg.backend,
                                   progress=cfg.progress, bf16=autocast_args(f0, cfg)["enabled"])


def texts_features(prep: Prepared, enc: Encoded) -> np.ndarray:
    """ghat's features (``cfg.outcome_features``): f_0's hidden states mean-pooled over the
    text (every layer side by side: on a small LM the last layer alone says little about
    content) and/or bag-of-token counts."""
    parts = []
    if prep.cfg.outcome_features in ("f0", "both"):
        # features only feed a regression: bf16 (1.8x on SmolLM2 here) is exact enough
        with torch.autocast(**autocast_args(prep.load_f0(), prep.cfg)):
            parts.append(mean_pooled_features(prep.load_f0(), enc,
                                              batch_size=prep.cfg.batch_size_eval,
                                              device=prep.device, layers="all"))
    if prep.cfg.outcome_features in ("tokens", "both"):
        parts.append(bag_of_words_features(enc, len(prep.tokenizer)))
    return np.concatenate(parts, axis=1)


def fit_outcome(prep: Prepared) -> None:
    """Stage outcome: ghat cross-fitted on the training rows (out-of-fold predictions),
    refit per fold for new texts; its quality goes to outcome_model.json."""
    cfg = prep.cfg
    feats = texts_features(prep, prep.train_enc)
    fit = fit_outcome_model(feats, np.asarray(prep.train_table.outcomes, np.float64),
                            kind=cfg.outcome_model,
                            folds=max(2, min(cfg.outcome_folds, len(prep.train_table) // 2)),
                            seed=cfg.seed, bound=True)  # ghat bounded to the outcome range
    prep.outcome_fit, prep.ghat_train = fit, np.asarray(fit.oof_pred, np.float64)
    if prep.eval_enc is not None:
        prep.ghat_eval = fit.predict(texts_features(prep, prep.eval_enc))
    if is_main():
        write_json(prep.layout.outcome_model, {**fit.summary(), "features": cfg.outcome_features})


def predict_outcome(prep: Prepared, texts: list[str], prompts: list[str] | None = None):
    """ghat on arbitrary texts (f_0's mean-pooled features -> the cross-fitted fit's mean)."""
    table = OutcomeTable(texts=[t if t.strip() else " " for t in texts], prompts=prompts)
    enc = encode(table, prep.tokenizer, prep.cfg.max_tokens, "truncate")
    return prep.outcome_fit.predict(texts_features(prep, enc))


def build_dm(prep: Prepared) -> None:
    """Stage dm: the DM set (reloaded when cached), its reference log-probs and ghat."""
    cfg = prep.cfg
    tag = f"{cfg.dm_size}_{cfg.dm_prefix_fraction}_{Path(cfg.dm_path or '').name}"
    dm_file = prep.layout.dm_set(cfg.dm_source, tag)
    if dm_file.is_file() and cfg.dm_source != "dataset":
        prep.dm = load_dm_set(dm_file, cfg.dm_source)
    else:
        prep.dm = build_dm_set(cfg, prep.load_f0(), prep.tokenizer, prep.train_table,
                               prep.train_enc, device=prep.device)
        if is_main():
            save_dm_set(prep.dm, dm_file)
    prep.dm_ref = ref_logprobs(prep, prep.dm.encoded, f"dm_{cfg.dm_source}")
    dm_feats = texts_features(prep, prep.dm.encoded)
    prep.dm_ghat = prep.outcome_fit.predict(dm_feats)
    prep.dm_support = support_report(prep.outcome_fit, dm_feats)
    if is_main():
        write_json(prep.layout.outcome_model, {**prep.outcome_fit.summary(),
                                               "features": cfg.outcome_features,
                                               "dm_set": prep.dm_support})
