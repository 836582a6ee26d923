"""Run configuration (cpo_fast/pipeline/run/config.py): YAML, flags and their errors, and the
settings pinned for the cached stages and for resuming."""

from __future__ import annotations

import pytest

from cpo_fast.pipeline.run.config import config_from


def test_config_yaml_flags_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-4\n  method: cpo\ndata:\n  max_tokens: 33\n")
    import argparse

    from cpo_fast.pipeline.run.config import add_config_flags

    p = argparse.ArgumentParser()
    add_config_flags(p)
    cfg = config_from(p.parse_args(["--config", str(y), "--method", "dr_cpo", "--lora", "false"]))
    assert (cfg.lr, cfg.method, cfg.max_tokens, cfg.lora) == (1e-4, "dr_cpo", 33, False)
    y.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        config_from(yaml_path=str(y))
    with pytest.raises(ValueError, match="--method='dr-cpo' is not one of .* Did you mean 'dr_cpo'"):
        config_from(method="dr-cpo")


def test_pins_are_declared_on_the_config_fields():
    """The prepare/resume keys live on the fields (config.py); these are the sets the
    pipeline has always used, so cached stages and checkpoints keep their meaning."""
    from cpo_fast.pipeline.run.config import FIELDS, pinned

    assert set(pinned("prepare")) == {
        "data", "text_column", "prompt_column", "max_rows", "eval_fraction", "seed",
        "max_tokens", "on_too_long", "tokenizer", "vocab_size", "base_model", "f0_model", "arch",
        "hidden_size", "num_layers", "num_heads", "f0_steps", "f0_lr", "f0_batch_size",
        "f0_lora"}  # LoRA or full SFT of f_0 (a pretrained base): it decides the cached f_0
    assert set(pinned("resume")) == {
        "method", "weighting", "steps", "batch_size", "grad_accum", "lr", "weight_decay",
        "warmup_steps", "grad_clip", "lora", "lora_r", "lora_alpha", "lora_dropout",
        "length_normalize", "entropy_coef", "kl_coef", "max_log_weight", "truncation",
        "clip_eps", "top_quantile", "dm_batch_size", "seed", "higher_is_better",
        "log_weight_cap", "ess_target"}  # the remedies change the loss: pinned like kl_coef
    assert {n for n, f in FIELDS.items() if f.metadata.get("local")} == {
        "stop_after", "progress", "threads", "device", "output_dir"}


def test_training_defaults_to_ess_targeted_tempering():
    """The CLI's and the TRL trainer's default remedy (constants.ESS_TARGET, chosen in
    benchmarks/results/real-remedies.md) reaches the objective; the loss objects keep the
    plain estimator; 0 turns it off; a share above 1 is refused by name."""
    from cpo_fast.constants import ESS_TARGET
    from cpo_fast.objectives import DRCPOLoss, Objective
    from cpo_fast.pipeline.run.config import RunConfig

    assert 0 < ESS_TARGET <= 1
    assert RunConfig().objective().ess_target == ESS_TARGET
    assert RunConfig(ess_target=0.0).objective().ess_target == 0.0
    assert Objective().ess_target == 0.0 and DRCPOLoss().objective.ess_target == 0.0
    with pytest.raises(ValueError, match="--ess-target"):
        RunConfig(ess_target=1.5).validate()
    trl = pytest.importorskip("trl")
    assert trl is not None
    from cpo_fast.trl import DRCPOConfig

    assert DRCPOConfig(output_dir="unused", report_to=[]).ess_target == ESS_TARGET
