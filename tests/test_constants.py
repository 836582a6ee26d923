"""The shared literals (cpo_fast/constants.py) are the ones every layer uses: each default of
the estimators, the objective, the float64 reference and the run settings is the constant,
and the constants mean what their docstrings say (IGNORE_INDEX is Hugging Face's ignored
label, WEIGHTINGS are exactly the schemes the estimators accept)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

import cpo_fast
from cpo_fast import constants, reference
from cpo_fast.estimators import dr_cpo_loss
from cpo_fast.models import collate
from cpo_fast.objectives import Objective
from cpo_fast.pipeline.run.config import RunConfig


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("fn", [dr_cpo_loss, reference.dr_cpo_loss], ids=["estimators", "reference"])
def test_loss_defaults_are_the_constants(fn):
    assert _default(fn, "max_log_weight") == constants.MAX_LOG_WEIGHT
    assert _default(fn, "truncation") == constants.TRUNCATION
    assert _default(fn, "clip_eps") == constants.CLIP_EPS


def test_objective_and_run_defaults_are_the_constants():
    o = Objective()
    assert (o.max_log_weight, o.truncation, o.clip_eps) == (
        constants.MAX_LOG_WEIGHT, constants.TRUNCATION, constants.CLIP_EPS)
    assert o.ess_target == 0.0  # the loss objects: the estimator as written
    cfg = RunConfig()
    assert cfg.ess_target == constants.ESS_TARGET  # training: tempered by default
    assert cfg.objective().ess_target == constants.ESS_TARGET
    assert cfg.weighting in constants.WEIGHTINGS


def test_ignore_index_is_hugging_faces_and_gets_no_log_prob():
    assert constants.IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index == -100
    assert cpo_fast.IGNORE_INDEX == constants.IGNORE_INDEX
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[2, constants.IGNORE_INDEX, 4]])
    logp = cpo_fast.token_logprobs(logits, labels, backend="reference")
    assert logp[0, 1] == 0 and logp[0, 0] != 0
    logp.sum().backward()
    assert torch.count_nonzero(logits.grad[0, 1]) == 0
    # collate marks the prompt and the padding with it
    enc = SimpleNamespace(input_ids=[[1, 2, 3], [1, 2]], score_start=[1, 0])
    labels = collate(enc, [0, 1], pad_id=0)["labels"]
    assert labels.tolist() == [[constants.IGNORE_INDEX, 2, 3], [1, 2, constants.IGNORE_INDEX]]


def test_weightings_are_exactly_the_accepted_schemes():
    assert cpo_fast.WEIGHTINGS == constants.WEIGHTINGS
    s, r, y = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.rand(6)
    for w in constants.WEIGHTINGS:
        assert torch.isfinite(dr_cpo_loss(s, r, y.double(), weighting=w).loss)
    with pytest.raises(ValueError, match="weighting='snips' is not one of"):
        dr_cpo_loss(s, r, y.double(), weighting="snips")
