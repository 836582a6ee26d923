"""The stages for a model and a dataset given as Python objects
(cpo_fast/pipeline/training/in_memory.py, behind ``cpo_fast.trl.DRCPOTrainer``) on their own:
a dataset becomes the CLI's validated table, with errors naming the DRCPOConfig field, the row
and the column; the held-out split is the CLI's; the stage cache key follows exactly the
settings and inputs the stages depend on; the refusals of ``build_stages`` that need no
model run; and the policy starts at f_0. The whole trainer runs in tests/test_trl.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from cpo_fast.pipeline.run.config import RunConfig
from cpo_fast.pipeline.stages.data import Encoded, OutcomeTable
from cpo_fast.pipeline.stages.modeling import build_model
from cpo_fast.pipeline.training import prepare
from cpo_fast.pipeline.training.in_memory import (
    _stage_key,
    build_stages,
    dataset_table,
    make_trainable,
    split_held_out,
)


class Rows:
    """The part of ``datasets.Dataset`` the stages read: column_names, len, ds[column]."""

    def __init__(self, **columns: list) -> None:
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, col: str) -> list:
        return self.columns[col]


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**dict(dataset_text_field="text", prompt_column=None,
                                     outcome_column="outcome", log_propensity_column=None), **kw})


def test_dataset_table_reads_texts_outcomes_prompts_propensities():
    t = dataset_table(Rows(text=["a b", "c"], outcome=[1, "2.5"], lp=[-1.0, -2.0]),
                      _args(log_propensity_column="lp"))
    assert t.texts == ["a b", "c"] and t.outcomes.tolist() == [1.0, 2.5]
    assert t.prompts is None and t.log_propensity.tolist() == [-1.0, -2.0]
    # TRL's prompt-completion format, found without dataset_text_field's column
    pc = dataset_table(Rows(prompt=["Say", "Tell"], completion=[" hi", " more"], outcome=[0, 1]),
                       _args())
    assert pc.texts == [" hi", " more"] and pc.prompts == ["Say", "Tell"]


@pytest.mark.parametrize(("rows", "args", "needle"), [
    (Rows(), _args(), "expected a non-empty datasets.Dataset"),
    (Rows(text=["a"], y=[1]), _args(), r"no column 'outcome' \(DRCPOConfig.outcome_column\); "
                                       r"its columns are \['text', 'y'\]"),
    (Rows(text=["a"], outcome=[1]), _args(prompt_column="p"), r"DRCPOConfig\(prompt_column=\.\.\.\)"),
    (Rows(text=["a", "b"], outcome=[1, None]), _args(), "row 2, column 'outcome': missing value"),
    (Rows(text=["a", "b"], outcome=[1, " "]), _args(), "row 2, column 'outcome': missing value"),
    (Rows(text=["a", "b"], outcome=["1", "high"]), _args(),
     "row 2, column 'outcome': 'high' is not a number"),
    (Rows(text=["a", "b"], outcome=[1, float("nan")]), _args(),
     "row 2, column 'outcome': value nan is not finite"),
    (Rows(text=["a", "  "], outcome=[1, 2]), _args(), "row 2, column 'text': empty text"),
    (Rows(text=["a", ["b"]], outcome=[1, 2]), _args(), "row 2, column 'text': expected text"),
])
def test_dataset_table_errors_name_field_row_and_column(rows, args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        dataset_table(rows, args, name="eval_dataset")
    assert str(e.value).startswith("eval_dataset")


def test_split_is_the_clis_seeded_split():
    t = OutcomeTable(texts=[f"t{i}" for i in range(20)], outcomes=np.arange(20.0))
    train, held = split_held_out(t, 0.25, seed=3)
    cli_train, cli_held = prepare.split_held_out(t, 0.25, np.random.default_rng(3))
    assert train.texts == cli_train.texts and held.texts == cli_held.texts
    assert len(held) == 5 and sorted(train.texts + held.texts) == sorted(t.texts)
    assert split_held_out(t, 0.25, seed=4)[1].texts != held.texts
    assert split_held_out(t, 0.0, seed=3)[1] is None


def test_stage_key_follows_what_the_stages_depend_on():
    enc = Encoded(input_ids=[[1, 2, 3], [1, 4]], score_start=[1, 1])
    cfg = RunConfig()
    key = _stage_key("f0", [enc, None], cfg)
    assert key == _stage_key("f0", [enc, None], RunConfig())  # deterministic
    changed = {
        "f_0": _stage_key("other", [enc, None], cfg),
        "data": _stage_key("f0", [Encoded(input_ids=[[1, 2, 3], [1, 5]], score_start=[1, 1]), None], cfg),
        "eval rows": _stage_key("f0", [enc, enc], cfg),
        "max_tokens": _stage_key("f0", [enc, None], dataclasses.replace(cfg, max_tokens=cfg.max_tokens + 1)),
        "seed": _stage_key("f0", [enc, None], dataclasses.replace(cfg, seed=cfg.seed + 1)),
        "dm_size": _stage_key("f0", [enc, None], dataclasses.replace(cfg, dm_size=cfg.dm_size + 1)),
        "outcome_folds": _stage_key("f0", [enc, None],
                                    dataclasses.replace(cfg, outcome_folds=cfg.outcome_folds + 1)),
    }
    assert all(k != key for k in changed.values()), [n for n, k in changed.items() if k == key]
    assert len(set(changed.values())) == len(changed)
    # training-only settings and the file names do not rebuild the stages
    for same in (dict(lr=cfg.lr * 2), dict(steps=cfg.steps + 1), dict(method="cpo"),
                 dict(data="elsewhere.csv"), dict(base_model="some/dir")):
        assert _stage_key("f0", [enc, None], dataclasses.replace(cfg, **same)) == key, same


def test_build_stages_refusals(tmp_path):
    t = OutcomeTable(texts=["a", "b"], outcomes=np.zeros(2))
    with pytest.raises(ValueError, match="1 rows after the held-out split; need >= 2"):
        build_stages(None, None, t.subset([0]), None, RunConfig(), tmp_path)
    with pytest.raises(ValueError, match="needs processing_class="):
        build_stages(None, None, t, None, RunConfig(), tmp_path)


def test_make_trainable_starts_at_f0_and_keeps_the_rng():
    f0 = build_model(vocab_size=50, **TINY_MODEL).requires_grad_(False)
    full = make_trainable(f0, None, seed=1)
    assert all(p.requires_grad for p in full.parameters())
    assert not any(p.requires_grad for p in f0.parameters())  # f_0 itself untouched
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), f0.parameters(), strict=True))
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_trainable(f0, lora, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the run's RNG did not move
    b = make_trainable(f0, lora, seed=1)
    c = make_trainable(f0, lora, seed=2)
    la = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    assert la and all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in la.items())
    assert any(not torch.equal(p, dict(c.named_parameters())[n]) for n, p in la.items())
    assert all("lora_" in n for n, p in a.named_parameters() if p.requires_grad)
