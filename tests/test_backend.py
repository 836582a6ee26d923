"""Backend selection and configuration (cpo_fast/_backend.py): the CPO_FAST_BACKEND
override, the error for Triton on a CPU without the interpreter, and the knobs (``Knobs``)
read from the environment at call time and overridden in code."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends

import cpo_fast
from cpo_fast._backend import cpu_extension_available

needs_fused = pytest.mark.skipif(not kernel_backends(), reason="no fused backend on this machine")
needs_cpu = pytest.mark.skipif(not cpu_extension_available(), reason="cpo_fast._C not built")


@needs_fused
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cpo_fast.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


@needs_fused
def test_env_variable_overrides_default(monkeypatch):
    monkeypatch.setenv("CPO_FAST_BACKEND", "reference")
    from cpo_fast._backend import resolve_backend

    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("CPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CPO_FAST_BACKEND"):
        resolve_backend(None, torch.device("cpu"))


@needs_cpu
def test_config_reads_env_at_call_time_and_override_wins(monkeypatch):
    from cpo_fast.cpu import linear_token_logprobs as cpu_linear
    from cpo_fast.cpu import token_logprobs as cpu_tok

    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_ROWS", "7")
    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_COLS", "13")
    assert cpu_linear.default_config() == cpu_linear.Config(block_rows=7, block_cols=13)
    with cpu_linear.override_config(block_cols=5):
        assert cpu_linear.default_config() == cpu_linear.Config(block_rows=7, block_cols=5)
    assert cpu_linear.default_config().block_cols == 13  # restored on exit
    monkeypatch.setenv("CPO_FAST_CPU_BLOCK_ROWS", "seven")
    with pytest.raises(ValueError, match="CPO_FAST_CPU_BLOCK_ROWS"):
        cpu_linear.default_config()
    with pytest.raises(TypeError, match="unknown field"), cpu_tok.override_config(tile=1):
        pass
