"""Test setup: run Triton kernels under the interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time, before any test module imports cpo_fast.kernels.

Also what several test modules share (they import it: ``from conftest import ...``, the
tests/ folder being on sys.path under pytest's default import mode): the repository's
paths, the backends this machine can test, the op tests' helpers (the ``isa`` fixture, label
and head-transform draws) and the pipeline tests' tiny settings. Helper modules next to it:
_dist.py (gloo ranks), fuzz_cases.py (the adversarial property); fixtures of the pipeline
tests are in tests/pipeline/conftest.py.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under CI (CI=true) hypothesis replays a fixed sequence of examples, so a submission's CI
# result does not depend on the draw; developers' runs keep exploring new examples.
settings.register_profile("ci", deadline=None, print_blob=True,
                          derandomize=os.environ.get("CI", "").lower() in ("1", "true"))
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# These import triton: after TRITON_INTERPRET is set.
from cpo_fast.constants import IGNORE_INDEX  # noqa: E402
from cpo_fast.models import token_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository
EMOBANK = ROOT.parent / "shared" / "data" / "emobank.csv"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dev(backend: str) -> str:
    """The device a backend's tensors live on (the C++ backend: the CPU)."""
    return "cpu" if backend == "cpu" else device()


def triton_usable() -> bool:
    from cpo_fast._backend import triton_available, triton_interpreting

    return triton_available() and (torch.cuda.is_available() or triton_interpreting())


def kernel_backends() -> list[str]:
    """The fused backends this machine can test (the reference is the ground truth)."""
    from cpo_fast._backend import cpu_extension_available

    out = []
    if triton_usable():
        out.append("triton")
    if cpu_extension_available():
        out.append("cpu")
    return out


def compiler_env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET: for a process that compiles for the GPU."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@functools.cache
def gpu_toolchain_missing() -> str | None:
    """Why Triton cannot compile for sm_80 and sm_90a here (None: it can). Probed in a
    process without the interpreter, the way the compiling tests run."""
    probe = ("from cpo_fast.bench import aot; "
             "print(all(aot.ptxas_path(cc) for cc in (80, 90)))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=compiler_env(),
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "probing triton timed out"
    if out.returncode != 0:
        return f"triton not importable: {out.stderr.strip().splitlines()[-1:]}"
    if out.stdout.strip() != "True":
        return "the triton wheel ships no ptxas for sm_80/sm_90a"
    return None


@pytest.fixture
def emobank_path() -> Path:
    if not EMOBANK.exists():
        pytest.skip(f"EmoBank not found at {EMOBANK}")
    return EMOBANK


# ---- shared by the op tests (tests/ops, tests/cpu, tests/test_transform.py) -------------------

ISAS = ["avx512", "avx2", "generic"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test on each kernel build of the C++ core (skipped where this CPU cannot run it)."""
    from cpo_fast import _C

    if request.param not in _C.isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("best")


def draw_labels(B, T, V, ignore, seed):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore == "all":
        labels[:] = IGNORE_INDEX
    elif ignore == "some":
        labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE_INDEX
    return labels


def head(temperature, softcap, logit_scale) -> dict:
    return dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)


@st.composite
def transforms(draw):
    temperature = draw(st.floats(0.3, 3.0))
    softcap = draw(st.sampled_from([None, 5.0, 30.0]))
    sign = draw(st.sampled_from([1.0, 1.0, -1.0]))
    logit_scale = sign * draw(st.floats(0.1, 4.0))
    return head(temperature, softcap, logit_scale)


# ---- shared by the pipeline tests (tests/pipeline) -------------------------------------------

# A tiny run (RunConfig fields): the prepared run of tests/pipeline/conftest.py and others.
TINY_RUN = dict(text_column="text", outcome_column="outcome", group_column="group", id_column="id",
                max_tokens=40, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
                f0_steps=6, f0_batch_size=16, steps=3, batch_size=8, dm_batch_size=8, dm_size=24,
                num_samples=12, max_new_tokens=12, bootstrap=50, outcome_folds=3, warmup_steps=1,
                save_every=0, progress=False, batch_size_eval=32, eval_fraction=0.2, lora_r=4,
                threads=None)
# A tiny model (build_model's keywords).
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, max_positions=64)


def sequence_token_logprobs(model, b, **kw):
    """The fused route: token log-probs [B, T-1] aligned with labels[:, 1:]."""
    tb = token_batch(model, b, **kw)
    return (tb.logp, tb.entropy) if kw.get("with_entropy") else tb.logp
