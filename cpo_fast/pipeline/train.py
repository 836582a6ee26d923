"""The training pipeline: data -> tokenizer -> f_0 (SFT) -> reference cache -> ghat -> DM set
-> policy (CPO, DR-CPO, OO-RLHF, SFT-all, SFT-top) -> checkpoints and metrics.

Read top to bottom: ``prepare`` builds (or reloads from ``output_dir``) everything shared by
the methods; ``train`` is the one optimization loop, used for f_0's SFT and for every
policy method. Policy log-probs go through the fused-linear op (``sequence_token_logprobs``:
backbone hidden states and the output weight, logits never built); reference log-probs come
from the on-disk cache, so no reference model is in memory while the policy trains.

Exact resume: batch k of a run is a pure function of (seed, k) (``batch_indices``), and a
checkpoint holds the trainable parameters, optimizer, scheduler and every RNG state, so a
resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cpo_fast.objectives import (
    dr_cpo_loss,
    entropy_bonus,
    kl_penalty,
    oo_rlhf_loss,
    sequence_logprobs,
    sft_loss,
    top_quantile_mask,
)
from cpo_fast.pipeline.config import RunConfig
from cpo_fast.pipeline.data import DataConfig, Encoded, OutcomeTable, collate, encode, load_table

IPW_METHODS = ("cpo", "dr_cpo")
DM_METHODS = ("dr_cpo", "oo_rlhf")
# Config fields that change what the loop computes: a resume must agree on all of them.
_RESUME_KEYS = ("method", "weighting", "steps", "batch_size", "grad_accum", "lr", "weight_decay",
                "warmup_steps", "grad_clip", "lora", "lora_r", "lora_alpha", "lora_dropout",
                "length_normalize", "entropy_coef", "kl_coef", "max_log_weight", "truncation",
                "clip_eps", "top_quantile", "dm_batch_size", "seed", "higher_is_better",
                "log_weight_cap")  # issue 11: log_weight_cap


# ----------------------------------------------------------------------------- basics

def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_indices(n: int, batch_size: int, k: int, seed: int) -> np.ndarray:
    """Row positions of micro-batch ``k``: consecutive slices of per-epoch permutations.

    A pure function of its arguments, so the data order after a resume is the same as in
    an uninterrupted run without saving any iterator state.
    """
    start = k * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[pos:pos + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def rng_state() -> dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(),
         "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.random.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- models

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
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json).")
    return AutoModelForCausalLM.from_pretrained(p, dtype=dtype, attn_implementation="sdpa").to(
        device)


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
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_model(model, tokenizer, path: str | Path) -> None:
    """save_pretrained: the adapter for LoRA (load on f_0 with peft), else the full model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- data a run sees

@dataclass
class TrainData:
    """Rows the loop samples from (``rows`` indexes ``enc``), and the DM set for DR/OO."""

    enc: Encoded
    rows: np.ndarray
    ref: list[np.ndarray]  # f_0 token log-probs per row, aligned with labels
    outcomes: np.ndarray | None = None
    log_propensity: np.ndarray | None = None
    ghat: np.ndarray | None = None  # cross-fitted (out-of-fold) predictions
    dm_enc: Encoded | None = None
    dm_ref: list[np.ndarray] | None = None
    dm_ghat: np.ndarray | None = None


def ref_tokens(ref: list[np.ndarray], idx, width: int) -> torch.Tensor:
    """Cached per-token log-probs of rows ``idx`` padded/cut to ``width`` label positions."""
    out = torch.zeros(len(idx), width, dtype=torch.float32)
    for b, i in enumerate(idx):
        r = torch.as_tensor(np.asarray(ref[int(i)], dtype=np.float32))[:width]
        out[b, : len(r)] = r
    return out


def _batch(data_enc: Encoded, idx, pad_id: int, device, ref, outcomes=None, lp=None, ghat=None):
    b = collate(data_enc, idx, pad_id, outcomes=outcomes, log_propensity=lp)
    b["ref"] = ref_tokens(ref, idx, b["labels"].shape[1])
    if ghat is not None:
        b["ghat"] = torch.as_tensor(np.asarray(ghat)[np.asarray(idx)], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


# ----------------------------------------------------------------------------- the loss

def compute_loss(model, batch, dm_batch, cfg: RunConfig, method: str):
    """Return (loss, LossOutput or None). Token log-probs: fused-linear op, no logits."""
    from cpo_fast.pipeline.modeling import sequence_token_logprobs

    def logp(b):
        want_h = cfg.entropy_coef > 0
        out = sequence_token_logprobs(model, b, with_entropy=want_h, backend=cfg.backend)
        return out if want_h else (out, None)

    from cpo_fast.pipeline.remedy import cap_log_weights  # issue 11: --log-weight-cap

    lo = None
    seq = lambda t, m: sequence_logprobs(t, m, length_normalize=cfg.length_normalize)
    cap = lambda p, r: cap_log_weights(p, r, cfg.log_weight_cap,
                                       self_normalized=cfg.weighting == "self_normalized")
    kw = dict(weighting=cfg.weighting, higher_is_better=cfg.higher_is_better,
              max_log_weight=cfg.max_log_weight, truncation=cfg.truncation, clip_eps=cfg.clip_eps)
    reg_logp = reg_mask = reg_ref = ent = None
    if method in ("sft_all", "sft_top"):
        tok, ent = logp(batch)
        mask = batch["labels"] != -100
        loss = sft_loss(tok, mask)
        reg_logp, reg_mask, reg_ref = tok, mask, batch["ref"]
    else:
        dm = {}
        if method in DM_METHODS:
            dtok, dent = logp(dm_batch)
            dmask = dm_batch["labels"] != -100
            dref = seq(dm_batch["ref"], dmask)
            dm = dict(dm_policy_logp=cap(seq(dtok, dmask), dref), dm_ref_logp=dref,
                      dm_outcome_pred=dm_batch["ghat"])
            reg_logp, reg_mask, reg_ref, ent = dtok, dmask, dm_batch["ref"], dent
        if method == "oo_rlhf":
            lo = oo_rlhf_loss(**dm, **kw)
        else:
            tok, ent_r = logp(batch)
            mask = batch["labels"] != -100
            ref = batch["log_propensity"] if "log_propensity" in batch else seq(batch["ref"], mask)
            lo = dr_cpo_loss(cap(seq(tok, mask), ref), ref, batch["outcome"],
                             batch["ghat"] if method == "dr_cpo" else None, **dm, **kw)
            if reg_logp is None:
                reg_logp, reg_mask, reg_ref, ent = tok, mask, batch["ref"], ent_r
        loss = lo.loss
    if cfg.entropy_coef and ent is not None:
        loss = loss + entropy_bonus(ent, reg_mask, cfg.entropy_coef)
    if cfg.kl_coef:
        loss = loss + kl_penalty(reg_logp, reg_ref, reg_mask, cfg.kl_coef)
    return loss, lo


# ----------------------------------------------------------------------------- the loop

def _scalar(x) -> float | None:
    return None if x is None else float(x)


def train(model, data: TrainData, cfg: RunConfig, out_dir: str | Path, *, pad_id: int,
          resume: bool = False, desc: str = "train", tokenizer=None) -> dict[str, Any]:
    """Optimize ``model`` for ``cfg.steps`` steps of ``cfg.method``; write metrics.jsonl and
    checkpoints under ``out_dir``; return a summary. ``resume=True`` continues from
    ``out_dir/checkpoint`` exactly (same batches, same RNG)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method, device = cfg.method, next(model.parameters()).device
    if method in DM_METHODS and data.dm_enc is None:
        raise ValueError(f"method={method!r} needs a DM set (TrainData.dm_enc) and ghat.")
    if method in IPW_METHODS and data.outcomes is None:
        raise ValueError(f"method={method!r} needs outcomes.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                    enabled=cfg.bf16 and device.type == "cuda")
    ckpt_path, metrics_path = out_dir / "checkpoint" / "state.pt", out_dir / "metrics.jsonl"
    run_keys = {k: getattr(cfg, k) for k in _RESUME_KEYS}

    start = 0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (ck["run_keys"].get(k), v) for k, v in run_keys.items()
                if ck["run_keys"].get(k) != v}
        if diff:
            raise ValueError(f"--resume: the checkpoint in {ckpt_path.parent} was written with "
                             f"other settings {diff} (checkpoint, now); use the same settings "
                             "or another --output-dir.")
        load_trainable_state(model, ck["params"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        start = ck["step"]
        if metrics_path.is_file():  # drop lines written after the checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
    else:
        if resume:
            print(f"[{desc}] --resume: no checkpoint at {ckpt_path}; starting from step 0.")
        metrics_path.write_text("")

    def save_checkpoint(step: int) -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"step": step, "params": trainable_state(model), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng_state(), "run_keys": run_keys,
                    "data_position": step * cfg.grad_accum}, tmp)
        os.replace(tmp, ckpt_path)  # atomic: a crash mid-save keeps the previous checkpoint
        if tokenizer is not None:
            save_model(model, tokenizer, ckpt_path.parent / "model")

    model.train()
    stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    # issue 11: ESS guard on the outcome rows' and the DM set's weights (pipeline/guard.py)
    from cpo_fast.pipeline.guard import WeightGuard, weight_stats
    guard = WeightGuard(cfg.ess_guard, cfg.stop_on_collapse, cfg.batch_size, cfg.dm_batch_size)
    last: dict[str, Any] = {}
    bar = tqdm(range(start, stop), desc=desc, disable=not cfg.progress, initial=start,
               total=stop)
    with metrics_path.open("a") as mf:
        for step in bar:
            t0 = time.perf_counter()
            ntok, stats = 0, []
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro
                idx = data.rows[batch_indices(len(data.rows), cfg.batch_size, k, cfg.seed)]
                batch = _batch(data.enc, idx, pad_id, device, data.ref, data.outcomes,
                               data.log_propensity, data.ghat)
                dm_batch = None
                if method in DM_METHODS:
                    didx = batch_indices(len(data.dm_enc), cfg.dm_batch_size, k, cfg.seed + 1)
                    dm_batch = _batch(data.dm_enc, didx, pad_id, device, data.dm_ref,
                                      ghat=data.dm_ghat)
                    ntok += int(dm_batch["attention_mask"].sum())
                ntok += int(batch["attention_mask"].sum())
                with torch.autocast(**autocast):
                    loss, lo = compute_loss(model, batch, dm_batch, cfg, method)
                (loss / cfg.grad_accum).backward()
                stats.append((float(loss.detach()), lo))
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            los = [s[1] for s in stats if s[1] is not None]
            mean = lambda xs: float(np.mean(xs)) if xs else None
            last = {"step": step + 1, "loss": mean([s[0] for s in stats]),
                    "ess": mean([_scalar(o.ess) for o in los if o.ess is not None]),
                    "max_weight_share": mean([_scalar(o.max_weight_share) for o in los
                                              if o.max_weight_share is not None]),
                    "clip_fraction": mean([_scalar(o.clip_fraction) for o in los
                                           if o.clip_fraction is not None]),
                    "value": mean([_scalar(o.value) for o in los if o.value is not None]),
                    "dm_ess": mean([_scalar(o.dm_ess) for o in los if o.dm_ess is not None]),
                    "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                    "tokens_per_s": ntok / dt, "batch_rows": cfg.batch_size * cfg.grad_accum}
            last.update(weight_stats(los), dm_batch_rows=cfg.dm_batch_size)  # issue 11
            if los and los[-1].weights is not None:  # for the weight histogram plot
                last["log_weights"] = [round(float(x), 4) for x in
                                       torch.log(los[-1].weights.clamp_min(1e-30)).tolist()]
            if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
                mf.write(json.dumps(last) + "\n")
                mf.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()  # issue 11: + dm_*
                             if k in ("loss", "ess", "max_weight_share", "dm_ess",
                                      "dm_max_weight_share", "grad_norm") and v is not None})
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
                save_checkpoint(step + 1)
            if guard.update(step + 1, last, dm_only=method == "oo_rlhf"):  # issue 11
                stop = step + 1
                break
    bar.close()
    final = stop if stop > start else start
    save_checkpoint(final)
    if final >= cfg.steps and tokenizer is not None:
        save_model(model, tokenizer, out_dir / "model")
    return {"steps_done": final, "finished": final >= cfg.steps,
            **{k: v for k, v in last.items() if k != "log_weights"},
            **guard.summary()}  # issue 11


# ----------------------------------------------------------------------------- shared stages

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
    dm_support: dict | None = None  # issue 11: DM texts outside ghat's support / clipped

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def load_f0(self):
        if self.f0 is None:
            self.f0 = load_causal_lm(self.f0_dir, self.device)
            self.f0.requires_grad_(False)
        return self.f0


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
    n_eval = int(round(cfg.eval_fraction * len(table)))
    if n_eval == 0:
        return table, None
    perm = rng.permutation(len(table))
    return table.subset(np.sort(perm[n_eval:])), table.subset(np.sort(perm[:n_eval]))


def get_tokenizer(cfg: RunConfig, texts: list[str], out: Path):
    from transformers import AutoTokenizer

    for src in (cfg.tokenizer, cfg.f0_model, cfg.base_model, out / "tokenizer"):
        if src and (Path(src) / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(src)
            break
    else:
        from cpo_fast.pipeline.tokenizer import train_tokenizer

        tok = train_tokenizer(texts, cfg.vocab_size, model_max_length=cfg.max_tokens)
        tok.save_pretrained(out / "tokenizer")
    tok.model_max_length = int(1e9)  # encode() truncates; silence HF's length warning
    if tok.pad_token_id is None:  # HF models often ship without a pad token
        tok.pad_token = tok.eos_token
    for name in ("bos", "eos"):
        if getattr(tok, f"{name}_token_id") is None:
            raise ValueError(f"tokenizer {cfg.tokenizer or cfg.f0_model or cfg.base_model} has "
                             f"no {name} token; set one in its tokenizer_config.json.")
    return tok


def fit_f0(cfg: RunConfig, tok, train_enc: Encoded, ref_dummy: list[np.ndarray], out: Path,
           device: torch.device, resume: bool) -> Path:
    """f_0 = SFT of the base model (or a new ``arch`` model) on the training texts."""
    f0_dir = out / "f0"
    if (f0_dir / "model" / "config.json").is_file():
        return f0_dir / "model"
    if cfg.base_model:
        base = load_causal_lm(cfg.base_model, device)
    else:
        from cpo_fast.pipeline.modeling import build_model

        base = build_model(cfg.arch, len(tok), hidden_size=cfg.hidden_size,
                           num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           max_positions=max(cfg.max_tokens, cfg.max_new_tokens + 8) + 8,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, seed=cfg.seed, device=device)
    sft_cfg = dataclasses.replace(cfg, method="sft_all", lora=False, lr=cfg.f0_lr,
                                  steps=cfg.f0_steps, batch_size=cfg.f0_batch_size, grad_accum=1,
                                  entropy_coef=0.0, kl_coef=0.0, stop_after=None,
                                  warmup_steps=min(cfg.warmup_steps, cfg.f0_steps // 10))
    data = TrainData(enc=train_enc, rows=np.arange(len(train_enc)), ref=ref_dummy)
    train(base, data, sft_cfg, f0_dir, pad_id=tok.pad_token_id, resume=resume, desc="f_0 SFT",
          tokenizer=tok)
    return f0_dir / "model"


def _ref_logprobs(prep_model, enc: Encoded, cfg: RunConfig, out: Path, key: str, device):
    from cpo_fast.pipeline.precompute import precompute_ref_logprobs

    return precompute_ref_logprobs(prep_model, enc, cache_dir=out / "cache", data_key=key,
                                   batch_size=cfg.batch_size_eval, device=device,
                                   backend=cfg.backend, progress=cfg.progress)


def texts_features(prep: Prepared, enc: Encoded) -> np.ndarray:
    """ghat's features (``cfg.outcome_features``): f_0's hidden states mean-pooled over the
    text (every layer side by side: on a small LM the last layer alone says little about
    content) and/or bag-of-token counts."""
    from cpo_fast.pipeline.outcome import bag_of_words_features, mean_pooled_features

    parts = []
    if prep.cfg.outcome_features in ("f0", "both"):
        parts.append(mean_pooled_features(prep.load_f0(), enc, batch_size=prep.cfg.batch_size_eval,
                                          device=prep.device, layers="all"))
    if prep.cfg.outcome_features in ("tokens", "both"):
        parts.append(bag_of_words_features(enc, len(prep.tokenizer)))
    return np.concatenate(parts, axis=1)


def predict_outcome(prep: Prepared, texts: list[str], prompts: list[str] | None = None):
    """ghat on arbitrary texts (f_0's mean-pooled features -> the cross-fitted fit's mean)."""
    table = OutcomeTable(texts=[t if t.strip() else " " for t in texts], prompts=prompts)
    enc = encode(table, prep.tokenizer, prep.cfg.max_tokens, "truncate")
    return prep.outcome_fit.predict(texts_features(prep, enc))


STAGES = ("f0", "precompute", "outcome", "all")
# Settings that decide the cached tokenizer and f_0 in an output dir (prepare.json).
_PREPARE_KEYS = ("data", "text_column", "prompt_column", "max_rows", "eval_fraction", "seed",
                 "max_tokens", "on_too_long", "tokenizer", "vocab_size", "base_model",
                 "f0_model", "arch", "hidden_size", "num_layers", "num_heads", "f0_steps",
                 "f0_lr", "f0_batch_size")


def _check_cached_settings(cfg: RunConfig, out: Path, *, record: bool = False) -> None:
    """Refuse to reuse a tokenizer / f_0 cached under other settings (stale results);
    ``record=True`` (once f_0 exists) writes the settings down."""
    path = out / "prepare.json"
    now = {k: getattr(cfg, k) for k in _PREPARE_KEYS}
    if path.is_file():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff:
            raise ValueError(f"--output-dir {str(out)!r} holds a tokenizer/f_0 built with other "
                             f"settings {diff} (then, now); use another --output-dir or the "
                             "same settings.")
    elif record:
        path.write_text(json.dumps(now, indent=2))


def prepare(cfg: RunConfig, *, need_dm: bool | None = None, resume: bool = False,
            table: tuple[OutcomeTable, OutcomeTable | None] | None = None,
            until: str = "all") -> Prepared:
    """Build or reload the shared stages under ``cfg.output_dir``, up to ``until``.

    ``need_dm``: build the DM set (default: when ``cfg.method`` uses it). ``table``: an
    already loaded (train, eval) split instead of ``cfg.data``.
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r} is not one of {STAGES}.")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown ours
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table is None:
        _check_cached_settings(cfg, out)
    device = pick_device(cfg)
    seed_everything(cfg.seed)
    train_t, eval_t = table if table is not None else load_split(cfg)
    if len(train_t) < 2:
        raise ValueError(f"only {len(train_t)} training rows; need at least 2.")
    texts = list(train_t.texts) + (list(train_t.prompts) if train_t.prompts else [])
    tok = get_tokenizer(cfg, texts, out)
    train_enc = encode(train_t, tok, cfg.max_tokens, cfg.on_too_long)
    eval_enc = encode(eval_t, tok, cfg.max_tokens, cfg.on_too_long) if eval_t is not None else None
    if train_enc.n_truncated:
        print(f"note: {train_enc.n_truncated} of {len(train_enc)} training rows were cut to "
              f"--max-tokens={cfg.max_tokens}.")

    if cfg.f0_model:
        f0_dir = Path(cfg.f0_model)
    else:  # the SFT loop needs no reference log-probs: zeros stand in for the cache
        zeros = [np.zeros(len(r) - 1, np.float32) for r in train_enc.input_ids]
        f0_dir = fit_f0(cfg, tok, train_enc, zeros, out, device, resume)
    if table is None:
        _check_cached_settings(cfg, out, record=True)
    prep = Prepared(cfg, device, out, tok, train_t, eval_t, train_enc, eval_enc, [], None, f0_dir)
    f0 = prep.load_f0()
    f0.eval()
    if until == "f0":
        return prep
    prep.train_ref = _ref_logprobs(f0, train_enc, cfg, out, "train", device)
    if eval_enc is not None:
        prep.eval_ref = _ref_logprobs(f0, eval_enc, cfg, out, "eval", device)

    if until == "precompute":
        return prep
    # ghat: cross-fitted on the training rows (out-of-fold), refit per fold for new texts.
    from cpo_fast.pipeline.outcome import fit_outcome_model

    feats = texts_features(prep, train_enc)
    fit = fit_outcome_model(feats, np.asarray(train_t.outcomes, np.float64),
                            kind=cfg.outcome_model, folds=max(2, min(cfg.outcome_folds, len(train_t) // 2)),
                            seed=cfg.seed, bound=True)  # issue 11: ghat bounded
    prep.outcome_fit, prep.ghat_train = fit, np.asarray(fit.oof_pred, np.float64)
    if eval_enc is not None:
        prep.ghat_eval = fit.predict(texts_features(prep, eval_enc))
    summary = {**fit.summary(), "features": cfg.outcome_features}  # issue 11: + bound, support
    (out / "outcome_model.json").write_text(json.dumps(summary, indent=2))

    if until == "outcome":
        return prep
    if need_dm is None:
        need_dm = cfg.method in DM_METHODS
    if need_dm:
        from cpo_fast.pipeline.dm import build_dm_set, load_dm_set, save_dm_set

        tag = f"{cfg.dm_size}_{cfg.dm_prefix_fraction}_{Path(cfg.dm_path or '').name}"
        dm_file = out / f"dm_{cfg.dm_source}_{tag}.jsonl"
        if dm_file.is_file() and cfg.dm_source != "dataset":
            prep.dm = load_dm_set(dm_file, cfg.dm_source)
        else:
            prep.dm = build_dm_set(cfg, f0, tok, train_t, train_enc, device=device)
            save_dm_set(prep.dm, dm_file)
        prep.dm_ref = _ref_logprobs(f0, prep.dm.encoded, cfg, out, f"dm_{cfg.dm_source}", device)
        dm_feats = texts_features(prep, prep.dm.encoded)
        prep.dm_ghat = fit.predict(dm_feats)
        from cpo_fast.pipeline.support import support_report  # issue 11

        prep.dm_support = support_report(fit, dm_feats)
        summary["dm_set"] = prep.dm_support
        (out / "outcome_model.json").write_text(json.dumps(summary, indent=2))
    return prep


def train_data(prep: Prepared, method: str) -> TrainData:
    cfg = prep.cfg
    rows = np.arange(len(prep.train_enc))
    y = np.asarray(prep.train_table.outcomes, np.float64)
    if method == "sft_top":
        m = top_quantile_mask(torch.as_tensor(y), cfg.top_quantile,
                              higher_is_better=cfg.higher_is_better)
        rows = rows[m.numpy()]
    if method in DM_METHODS and prep.dm is None:
        raise ValueError(f"method={method!r} needs the DM set: call prepare(..., need_dm=True).")
    lp = prep.train_table.log_propensity
    return TrainData(enc=prep.train_enc, rows=rows, ref=prep.train_ref, outcomes=y,
                     log_propensity=lp, ghat=prep.ghat_train,
                     dm_enc=prep.dm.encoded if prep.dm is not None else None,
                     dm_ref=prep.dm_ref, dm_ghat=prep.dm_ghat)


def train_policy(prep: Prepared, cfg: RunConfig | None = None, *, out_dir: str | Path | None = None,
                 resume: bool = False):
    """Train ``cfg.method`` from f_0; returns (policy model, summary dict)."""
    cfg = cfg or prep.cfg
    out_dir = Path(out_dir or prep.out / cfg.method)
    seed_everything(cfg.seed)
    policy = make_policy(prep.load_f0(), cfg)
    prep.f0 = None  # no reference model in memory while training (the cache stands in)
    summary = train(policy, train_data(prep, cfg.method), cfg, out_dir, pad_id=prep.pad_id,
                    resume=resume, desc=cfg.method, tokenizer=prep.tokenizer)
    return policy, summary
