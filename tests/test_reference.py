"""The float64 reference (cpo_fast/reference.py) has the public functions' signatures."""

from __future__ import annotations

import cpo_fast
from cpo_fast import reference


def test_reference_has_the_public_signatures():
    """reference.<name> takes the fast path's parameters with the same defaults (the fast
    ops add only backend/dispatch knobs: grad_coef and grad_coef_entropy announce the loss's
    coefficients so the gradient can be formed early; they change no value)."""
    import inspect

    extra = {"backend", "inplace_backward", "validate", "grad_skip_threshold", "grad_coef",
             "grad_coef_entropy"}
    for name in ("token_logprobs", "linear_token_logprobs", "dr_cpo_loss", "cpo_loss",
                 "oo_rlhf_loss", "sequence_logprobs", "sft_loss", "entropy_bonus", "kl_penalty"):
        fast = inspect.signature(getattr(cpo_fast, name)).parameters
        ref = inspect.signature(getattr(reference, name)).parameters
        assert set(fast) - extra == set(ref), name
        for p in ref:
            assert ref[p].default == fast[p].default and ref[p].kind == fast[p].kind, (name, p)
