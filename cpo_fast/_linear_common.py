"""What both fused-linear backends (Triton, C++ CPU) share: the step that turns one
``dL/dz`` tile into the three gradients.

Both backends recompute the logits tile by tile in backward and form ``dz = dL/dz`` of a
``[rows, cols]`` tile (Triton in its dz kernel, the CPU backend in C++ over a float32
block); :func:`consume_dz` then runs the dense GEMMs that consume it (math.md):

    grad_W[cols] (+)= dz^T h[rows],   grad_h[rows] += dz W[cols],   grad_b[cols] (+)= sum_rows dz

The loops around it differ on purpose: Triton walks row groups outside and vocabulary
chunks inside (grad_h of a row group lives in one fp32 accumulator), the CPU backend
vocabulary blocks outside and row blocks inside (one fp32 block of grad_W at a time).
"""

from __future__ import annotations

import torch
from torch import Tensor


def consume_dz(dz: Tensor, h_r: Tensor, w_c: Tensor, gw_c: Tensor | None, acc_r: Tensor | None,
               prod: Tensor | None, gb_c: Tensor | None, first: bool) -> None:
    """Accumulate one ``dz`` tile (rows ``h_r``, vocabulary entries ``w_c``) into the gradients.

    ``gw_c``: grad_W of these columns, written when ``first`` (the first tile of rows to reach
    them), accumulated after. ``acc_r``: grad_h of these rows, always accumulated (zero it
    first), in fp32: in place when it has dz's dtype, else through ``addmm(out_dtype=fp32)``
    or, where that is unavailable (``prod`` given: CPU, torch < 2.8), a product buffer of
    ``acc_r``'s shape in dz's dtype. ``gb_c``: fp32 grad_b of these columns, like ``gw_c``.
    Any of the three may be None (not wanted)."""
    if gw_c is not None:
        if first:
            torch.mm(dz.t(), h_r, out=gw_c)
        else:  # accumulated in gw_c's dtype
            gw_c.addmm_(dz.t(), h_r)
    if acc_r is not None:
        if acc_r.dtype == dz.dtype:  # fp32: accumulate in the output itself
            acc_r.addmm_(dz, w_c)
        elif prod is None:
            torch.addmm(acc_r, dz, w_c, out_dtype=torch.float32, out=acc_r)
        else:  # no fp32-out addmm from half operands here: a product buffer, then add
            torch.mm(dz, w_c, out=prod)
            acc_r.add_(prod)
    if gb_c is not None:
        if first:
            torch.sum(dz, dim=0, dtype=torch.float32, out=gb_c)
        else:
            gb_c += torch.sum(dz, dim=0, dtype=torch.float32)


def addmm_out_dtype_ok(device: torch.device) -> bool:
    """torch.addmm(..., out_dtype=float32) on half operands: CUDA, torch >= 2.8."""
    if device.type != "cuda":
        return False
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)
