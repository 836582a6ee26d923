"""Autograd ops over the output layer: one op per module, same name as the public function.

``token_logprobs`` (from logits) and ``linear_token_logprobs`` (from hidden states and the
output weight, logits never materialized). Each module holds the op's ``torch.library``
custom ops, their autograd, and the public wrapper that validates the inputs and picks a
backend. The backend contract (what ``cpo_fast.kernels.<op>`` and ``cpo_fast.cpu.<op>``
implement, the None convention, saved state, tuning knobs, dispatch and float64 reroute)
is written once, in the docstring of ``cpo_fast/_backend.py``.
"""

from cpo_fast.ops.linear_token_logprobs import linear_token_logprobs
from cpo_fast.ops.token_logprobs import token_logprobs

__all__ = ["linear_token_logprobs", "token_logprobs"]
