r"""C++/OpenMP CPU backend (``cpo_fast._C``) of the fused ops: one module per op.

``cpo_fast.cpu.token_logprobs`` and ``cpo_fast.cpu.linear_token_logprobs`` implement the
backend contract written in ``cpo_fast/_backend.py``; ``_common`` holds what both share
(tensor checks, dtype names, the thread count, the ``_C`` head-transform keywords, the
gradient-buffer pool; the Config machinery is ``cpo_fast._backend.Knobs``). The C++ side
receives raw addresses, shapes, element strides and a ``_C.DType`` (no libtorch link); every
``_C`` function is called by keyword.

Math (docs/math.md). Per row ``z`` of length V with label ``y``, one pass keeps a running
max ``m`` and, relative to it, ``s = sum_v e^(z_v - m)`` and ``a = sum_v e^(z_v - m) (z_v - m)``:

    lse = m + log s,    logp = z_y - lse,    H = lse - sum_v p_v z_v = log s - a / s

(no cancellation of large logits), and backward, from ``G = dL/dlogp``, ``E = dL/dH``:

    dL/dz_v = G ([v == y] - p_v) - E p_v (log p_v + H),     p_v = e^(z_v - lse)

with ``p_v log p_v = 0`` at ``z_v = -inf``.

Large gradient buffers come from a reuse pool in ``_C`` (``_common.empty_grad``;
``CPO_FAST_CPU_GRAD_POOL`` regions kept, default 2; :func:`release_buffers` unmaps them).
"""



def release_buffers() -> int:
    """Unmap the gradient buffers kept for reuse; returns the bytes freed (0 without _C)."""
    from cpo_fast._backend import cpu_extension_available

    if not cpu_extension_available():
        return 0
    from cpo_fast.cpu._common import release_buffers as release

    return release()


__all__ = ["release_buffers"]
