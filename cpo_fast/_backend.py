"""Backend selection and dispatch for the fused ops: the backend contract, written once.

Backends (one module per op per backend, same function names in each; the table
``IMPLEMENTATIONS`` below maps ``(backend, op)`` to a loader that imports the module by name,
on first use):

==============  ================================  =========================================
backend         module for op ``<op>``            runs on
==============  ================================  =========================================
``"triton"``    ``cpo_fast.kernels.<op>``         CUDA tensors natively; CPU tensors only
                                                  under Triton's interpreter
                                                  (``TRITON_INTERPRET=1`` set before import)
``"cpu"``       ``cpo_fast.cpu.<op>``             CPU tensors, through the C++/OpenMP core
                                                  ``cpo_fast._C``
``"reference"`` ``cpo_fast.reference.<op>``       anything torch runs on (plain PyTorch,
                                                  materializes log-softmax; the tests'
                                                  ground truth and the float64 path)
==============  ================================  =========================================

Ops (``<op>``): ``token_logprobs`` and ``linear_token_logprobs``. :func:`backend_module`
returns the fused module of a ``(backend, op)`` pair through that table; the reference is
called directly by the ops (``cpo_fast.reference.<op>``).

Selection (:func:`select_backend`). ``backend=None`` picks the best available for the
tensor's device (CUDA: triton; CPU: cpu when ``cpo_fast._C`` is built, else reference with a
one-time warning); the environment variable ``CPO_FAST_BACKEND`` overrides that default; an
explicit ``backend=`` argument wins over both. float64 inputs always run on the reference
(the kernels accumulate in float32; float64 is the gradcheck dtype). Empty inputs run on
the reference too (nothing to launch).

Contract of a fused backend module (``triton`` and ``cpu``). The public wrappers in
``cpo_fast/ops/<op>.py`` validate every argument first, so a backend receives:

* ``labels``: int64, contiguous, ``[N]`` (N = number of rows), each either in ``[0, V)``
  or equal to ``ignore_index`` (unless the caller passed ``validate=False``: then a backend
  must still never read out of bounds, and gives NaN for an out-of-range label).
* float inputs of dtype float32, bfloat16 or float16 (never float64).
* A missing optional tensor is ``None``, on input and on output (``bias=None``,
  ``grad_entropy=None`` when the entropy has no gradient, ``entropy=None`` returned when
  ``with_entropy=False``). Only the ``torch.library`` custom-op boundary in ``cpo_fast/ops/``
  turns None into an empty tensor and back (custom ops must return tensors); it accepts an
  empty tensor from a backend as None too.
* Ignored rows (label == ignore_index) get logp = 0, entropy = 0, lse = 0 and a zero
  gradient, and their logits are not read.

``token_logprobs`` backends define::

    token_logprobs_forward(logits3, labels, ignore_index, with_entropy, *, config=None,
                           transform=None)
        -> (logp [N], entropy [N] or None, lse [N])          float32
    token_logprobs_backward(logits3, labels, lse, entropy, grad_logp, grad_entropy,
                            ignore_index, grad_out3, *, config=None,
                            transform=None) -> None

    # optional: the buffer the out-of-place backward writes into
    new_grad_buffer(logits) -> Tensor   # uninitialized, logits' shape and dtype

``logits3`` is a ``[B, T, V]`` view with arbitrary element strides (N = B*T);
``grad_out3`` has its shape and dtype (it may be ``logits3`` itself, for the in-place
backward) and the backend writes every element of it. Without ``new_grad_buffer`` the op
allocates ``torch.empty(logits.shape)``; the CPU backend's hook hands out reused, huge-page
advised buffers (no page faults per training step).

``linear_token_logprobs`` backends define::

    linear_token_logprobs_forward(hidden, weight, bias, labels, ignore_index, with_entropy,
                                  *, config=None, transform=None)
        -> (logp [N], entropy [N] or None, lse [N])          float32
    linear_token_logprobs_backward(hidden, weight, bias, labels, lse, entropy, grad_logp,
                                   grad_entropy, ignore_index, needs_hidden_grad,
                                   needs_weight_grad, needs_bias_grad, grad_skip_threshold,
                                   *, config=None, transform=None)
        -> (grad_hidden [N, d] or None, grad_weight [V, d] or None, grad_bias [V] or None)
    # optional: the frozen-weight fast path (see cpo_fast/ops/linear_token_logprobs.py)
    linear_token_logprobs_forward_frozen(hidden, weight, bias, labels, ignore_index,
                                         with_entropy, *, config=None,
                                         transform=None)
        -> (logp, entropy or None, lse, pw [N, d], plw [N, d] or None)

``hidden [N, d]`` and ``weight [V, d]`` are contiguous and share a dtype, ``bias`` is None
or contiguous ``[V]``; gradients come back in their input's dtype (accumulated in float32).

Head transforms. Every backend function above also takes a keyword argument
``transform: HeadTransform | None = None`` (the forward, the backward and the frozen
forward alike): the one ``HeadTransform`` value (defined in ``cpo_fast/_transform.py``,
re-exported here) that the public op built from its ``transform=`` or
``temperature=``/``softcap=``/``logit_scale=`` arguments (or that
``HeadTransform.from_model`` read from a Hugging Face config), applied to each raw logit
``z`` before the softmax,

    u = logit_scale * z,    z' = (softcap * tanh(u / softcap) if softcap else u) / temperature

(Hugging Face / TRL order). logp, entropy and lse are those of ``z'``; the backward returns
``dL/dz = dL/dz' * (logit_scale / temperature) * (1 - tanh(u / softcap)^2 if softcap else 1)``.
``None`` (or an identity ``HeadTransform``) must run exactly the untransformed code: the ops
pass ``None`` for the defaults. The value travels unchanged, with one exception: the
``torch.library`` custom-op schema carries scalars only, so the op unpacks it there
(``_transform.schema_scalars``) and rebuilds it inside the op (``_transform.from_schema``).
Whatever a backend's kernels need (Triton's ``pre``/``post``/``grad`` scalars and constexpr
flags, the C++ bridge's ``pre``/``post``/``softcap`` keywords) is derived from it inside the
backend, at the launch. A backend without a frozen-weight path for a softcap need not have
one: the op uses that path only without a softcap (see
``cpo_fast/ops/linear_token_logprobs.py``).

Saved state. The forward saves only O(N) values for the backward: ``lse`` (and the entropy
when it has a gradient; ``pw``/``plw`` on the frozen path). The ``ctx`` of each op holds the
saved tensors through ``ctx.save_for_backward`` and its non-tensor arguments as one tuple
``ctx.args``.

Tuning knobs. Each backend module defines a frozen dataclass ``Config`` (tile sizes,
threads...), ``default_config(...) -> Config`` (environment variables such as
``CPO_FAST_CPU_BLOCK_ROWS`` or ``CPO_FAST_LINEAR_ROW_GROUP`` are read when it is called,
never at import) and a context manager ``override_config(**fields)``, the one way tests
force small tiles; the machinery behind the three is :class:`Knobs`, written once here.
Launchers take ``config: Config | None = None`` (None: the default).

Adding a backend: write ``<package>/<op>.py`` for both ops with the functions above, add its
name to ``BACKENDS``, one loader per op to ``IMPLEMENTATIONS`` and a device rule to
:func:`resolve_backend` here, and add its name to the tests' ``kernel_backends()``
(tests/conftest.py); the op tests then compare it against the float64 reference on
hypothesis-drawn cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

BACKENDS = ("triton", "cpu", "reference")
OPS = ("token_logprobs", "linear_token_logprobs")


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): the one place that
    reads the variable (kernels and tests import this)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_cpu_extension() -> bool:
    try:
        from cpo_fast import _C  # noqa: F401
    except ImportError:
        return False
    return True


# Probed once at import: plain module constants keep resolve_backend traceable by
# torch.compile (dynamo warns on functools.cache wrappers and cannot trace imports).
_TRITON = importlib.util.find_spec("triton") is not None
_CPU_EXT = _probe_cpu_extension()


def triton_available() -> bool:
    return _TRITON


def cpu_extension_available() -> bool:
    return _CPU_EXT


@functools.cache
def _warn_no_extension() -> None:
    warnings.warn(
        "cpo_fast: the C++ CPU core (cpo_fast._C) is not built, so CPU tensors use the "
        "PyTorch reference path (slower, materializes log-softmax). Build it with "
        "`pip install -e .` from a checkout with a C++ compiler and pybind11.",
        stacklevel=3,
    )


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return the backend name to run on ``device``, or raise a ValueError saying why not."""
    source = "the backend argument"
    if backend is None:
        backend = os.environ.get("CPO_FAST_BACKEND") or None
        source = "the environment variable CPO_FAST_BACKEND"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} (from {source}) is not one of {BACKENDS}; use one of them, "
            "or None for the best available."
        )
    if backend is None:
        if device.type == "cuda":
            return "triton" if triton_available() else "reference"
        if device.type == "cpu":
            if cpu_extension_available():
                return "cpu"
            _warn_no_extension()
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: `pip install triton`.")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors: Triton runs on CPU tensors only under its "
                "interpreter. Set TRITON_INTERPRET=1 before importing triton, move the tensors "
                "to a CUDA device, or use backend='cpu' / 'reference'."
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support device {device}.")
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}.")
        if not cpu_extension_available():
            raise ValueError(
                "backend='cpu' needs the C++ extension cpo_fast._C, which is not built: "
                "run `pip install -e .` with a C++ compiler available."
            )
    return backend


def select_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on ``device``/``dtype``: :func:`resolve_backend`, then
    float64 rerouted to the reference (the kernels accumulate in float32)."""
    name = resolve_backend(backend, device)
    if name != "reference" and dtype == torch.float64:
        return "reference"
    return name


# ---- the dispatch table: (backend, op) -> the module implementing the contract -----------
# Each loader imports its module when first called (triton and _C load only when used).

def _triton_token_logprobs() -> ModuleType:
    from cpo_fast.kernels import token_logprobs

    return token_logprobs


def _triton_linear_token_logprobs() -> ModuleType:
    from cpo_fast.kernels import linear_token_logprobs

    return linear_token_logprobs


def _cpu_token_logprobs() -> ModuleType:
    from cpo_fast.cpu import token_logprobs

    return token_logprobs


def _cpu_linear_token_logprobs() -> ModuleType:
    from cpo_fast.cpu import linear_token_logprobs

    return linear_token_logprobs


IMPLEMENTATIONS: dict[tuple[str, str], Callable[[], ModuleType]] = {
    ("triton", "token_logprobs"): _triton_token_logprobs,
    ("triton", "linear_token_logprobs"): _triton_linear_token_logprobs,
    ("cpu", "token_logprobs"): _cpu_token_logprobs,
    ("cpu", "linear_token_logprobs"): _cpu_linear_token_logprobs,
}


def backend_module(backend: str, op: str) -> ModuleType:
    """The module implementing ``op``'s contract on the fused ``backend`` (imported)."""
    load = IMPLEMENTATIONS.get((backend, op))
    if load is None:
        raise ValueError(f"no fused implementation of op {op!r} on backend {backend!r}; "
                         f"the table holds {sorted(IMPLEMENTATIONS)}.")
    return load()


def optional(t: Tensor | None) -> Tensor | None:
    """A backend's 'no tensor' as None (an empty tensor from a custom op counts as None)."""
    return None if t is None or t.numel() == 0 else t


# ---- tuning knobs, written once for every backend module ------------------------------------

C = TypeVar("C")


class Knobs(Generic[C]):
    """A backend module's ``Config`` machinery: defaults, environment variables and the
    test-time overrides. The module defines ``_KNOBS = Knobs(Config, env={field: VAR})``,
    ``override_config = _KNOBS.override_config`` and a ``default_config(...)`` that returns
    ``_KNOBS.resolve(<its shape-dependent defaults>)``."""

    def __init__(self, cls: type[C], env: dict[str, str] | None = None) -> None:
        self.cls = cls
        self.env = dict(env or {})
        self.overrides: dict[str, Any] = {}

    def resolve(self, base: C | None = None) -> C:
        """``base`` (default ``Config()``), then the integer environment variables (read now,
        never at import), then the fields of any :meth:`override_config` in effect."""
        fields: dict[str, Any] = {}
        for field, var in self.env.items():
            raw = os.environ.get(var)
            if raw:
                try:
                    fields[field] = int(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} must be an integer.") from None
        fields.update(self.overrides)
        base = self.cls() if base is None else base
        return dataclasses.replace(base, **fields) if fields else base

    @contextlib.contextmanager
    def override_config(self, **fields: Any) -> Iterator[None]:
        """``with override_config(field=value, ...):`` every default inside the block has
        these fields (the one way tests force small tiles; no module constants to patch)."""
        names = {f.name for f in dataclasses.fields(self.cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"override_config: unknown field(s) {unknown}; "
                            f"{self.cls.__module__}.Config has {sorted(names)}.")
        saved = dict(self.overrides)
        self.overrides.update(fields)
        try:
            yield
        finally:
            self.overrides.clear()
            self.overrides.update(saved)
