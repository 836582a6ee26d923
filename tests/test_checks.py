"""Argument validation shared by the ops and objectives (cpo_fast/_checks.py), called
directly: each error names the argument, the value or index, and the fix. The ops' and
objectives' use of them is tested with each of those (tests/ops/, tests/test_objectives.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from cpo_fast._checks import (
    check_finite,
    check_finite_seq,
    check_float,
    check_head_transform,
    check_labels,
    check_same_shape,
    index_list,
    warn_nonfinite_rows,
)
from cpo_fast._transform import HeadTransform


def test_check_float():
    check_float("logits", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor .* torch\.int64; "
                                        r"cast it with \.float\(\)"):
        check_float("logits", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got list"):
        check_float("hidden", [1.0])


def test_check_labels():
    shape = torch.Size([2, 3])
    check_labels(torch.tensor([[0, 4, -100], [1, 2, 3]]), shape, 5, -100)
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 5 is outside the vocabulary \[0, 5\) "
                                         r"and is not ignore_index=-100"):
        check_labels(torch.tensor([[0, 4, -100], [1, 2, 5]]), shape, 5, -100)
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = -1 is outside"):
        check_labels(torch.tensor([[-1, 0, 0], [0, 0, 0]]), shape, 5, -100)
    check_labels(torch.tensor([[9, 9, 9], [9, 9, 9]]), shape, 5, -100, validate=False)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 2\) but must equal "
                                         r"logits\.shape\[:-1\] = \(2, 3\)\. .* shift them"):
        check_labels(torch.zeros(3, 2, dtype=torch.long), shape, 5, -100)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch\.float32; "
                                        r"use \.long\(\)"):
        check_labels(torch.zeros(2, 3), shape, 5, -100)


def test_finite_and_shape_checks():
    check_finite("outcome", torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"outcome has a non-finite value \(nan\) at index \[1\]; "
                                         r".* drop or impute those rows"):
        check_finite("outcome", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"policy_logp has non-finite values \[inf\] at indices "
                                         r"\[2\]"):
        check_finite_seq("policy_logp", torch.tensor([0.0, 1.0, float("inf")]))
    check_same_shape("outcome_pred", None, "outcome", torch.zeros(3))
    with pytest.raises(ValueError, match=r"outcome_pred has shape \(2,\) but must match outcome "
                                         r"\(3,\)"):
        check_same_shape("outcome_pred", torch.zeros(2), "outcome", torch.zeros(3))


def test_index_list_says_how_many_more():
    m = torch.zeros(3, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = True
    assert index_list(m) == "[(0, 1), (2, 3)]"
    assert index_list(torch.ones(8, dtype=torch.bool), limit=3) == "[0, 1, 2] and 5 more"


def test_nonfinite_rows_warn_only_where_not_ignored():
    labels = torch.tensor([3, -100, 4])
    logp = torch.tensor([0.0, float("nan"), -1.0])
    with pytest.warns(RuntimeWarning) as rec:
        warn_nonfinite_rows("token_logprobs", "logits", labels, -100, logp,
                            torch.tensor([0.0, 0.0, float("inf")]))
    assert len(rec) == 1 and "non-finite log-probability or entropy at rows (index into " \
        "labels) [2]: logits holds NaN" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_nonfinite_rows("token_logprobs", "logits", labels, -100, logp)  # row 1 is ignored


def test_check_head_transform():
    tf = check_head_transform(HeadTransform(2, 30, 1))
    assert tf == HeadTransform(2.0, 30.0, 1.0) and isinstance(tf.temperature, float)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0, got 0\.0; use 1\.0"):
        check_head_transform(HeadTransform(0.0))
    with pytest.raises(ValueError, match=r"softcap must be None or finite and > 0, got 0\.0; pass "
                                         r"softcap=None"):
        check_head_transform(HeadTransform(softcap=0.0))
    with pytest.raises(ValueError, match="logit_scale must be finite, got inf"):
        check_head_transform(HeadTransform(logit_scale=float("inf")))
    with pytest.raises(TypeError, match=r"temperature must be a Python float, got a tensor; pass "
                                        r"temperature=temperature\.item\(\)"):
        check_head_transform(HeadTransform(torch.tensor(2.0)))
    with pytest.raises(TypeError, match="softcap must be a float, got bool"):
        check_head_transform(HeadTransform(softcap=True))
