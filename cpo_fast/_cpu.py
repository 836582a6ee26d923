"""Backward-compatible alias: the CPU backend now lives in ``cpo_fast.cpu`` (one module per
op). Import from ``cpo_fast.cpu.token_logprobs`` / ``cpo_fast.cpu.linear_token_logprobs``."""

from cpo_fast.cpu.linear_token_logprobs import (  # noqa: F401
    linear_token_logprobs_backward,
    linear_token_logprobs_forward,
    linear_token_logprobs_forward_frozen,
)
from cpo_fast.cpu.token_logprobs import (  # noqa: F401
    token_logprobs_backward,
    token_logprobs_forward,
)
