"""Autograd ops over the output layer: one op per module."""

from cpo_fast.ops.linear_token_logprobs import linear_token_logprobs
from cpo_fast.ops.token_logprobs import token_logprobs

__all__ = ["linear_token_logprobs", "token_logprobs"]
