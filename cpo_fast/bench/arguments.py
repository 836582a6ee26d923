"""The flags and help text of ``cpo-fast bench``: all the CLI imports to build its parser.

Light on purpose (argparse only, no torch): every ``cpo-fast`` command builds the whole
parser, so this module is imported by each of them; the work is in cpo_fast.bench.command,
imported only when ``cpo-fast bench`` runs.
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
``cpo-fast bench``: op-level and end-to-end comparison on your own shapes and device.

    cpo-fast bench --vocab 151936 --hidden 4096 --tokens 8192 --dtype bf16 [--frozen-head] [--json]

Op level (fwd+bwd of ``sum_t g_t logp_t`` from hidden states [N, d] and a head weight [V, d]):

    eager           (h @ W.T).float().log_softmax(-1).gather(-1, y)      logits materialized
    cpo_fast-logits cpo_fast.token_logprobs(h @ W.T, y)                  logits materialized
    cpo_fast-linear cpo_fast.linear_token_logprobs(h, W, y)              logits never built
    trl-selective   trl.trainer.utils.selective_log_softmax(h @ W.T, y)  (trl installed)
    trl-fused-head  the chunked kernel behind TRL's add_fused_lm_head     (trl installed)

End to end (one training step, forward + backward + AdamW step, of a tiny Llama-config model
with that vocabulary and hidden size; LoRA with a frozen head under --frozen-head, else full
fine-tuning): path ``eager`` (HF logits + log_softmax + gather), ``cpo_fast`` (the backbone's
hidden states into the fused op) and ``trl-fused-head`` (TRL's patched forward).

Every case runs in a fresh process forked from one server process that has imported torch,
transformers, peft and trl once, so one case's freed memory or compiled graphs never colour the next, and
peak memory is honest: on the CPU the peak RSS growth of one call (VmHWM reset through
/proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated over one call.
benchmarks/bench_e2e.py uses the same machinery (cpo_fast.bench.isolation.run_isolated, the
cases of cpo_fast.bench.cases) for its grid and its largest-batch search (docs/benchmarks.md).
"""

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # torch dtypes: cpo_fast.bench.e2e.DTYPES


def _positive(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return conv


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``cpo-fast bench`` (registered by cpo_fast/cli.py); each help text states
    its default once (the parser adds none)."""
    p.add_argument("--vocab", type=_positive("--vocab"), default=32000,
                   help="vocabulary size V (default: 32000)")
    p.add_argument("--hidden", type=_positive("--hidden"), default=256,
                   help="hidden size d (default: 256)")
    p.add_argument("--tokens", type=_positive("--tokens"), default=512,
                   help="tokens N: op-level rows; end to end, a batch of N tokens in sequences "
                        "of min(N, --seq) (default: 512)")
    p.add_argument("--seq", type=_positive("--seq"), default=256,
                   help="sequence length of the end-to-end batch (default: 256)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="dtype of the hidden states, weights and model (default: fp32)")
    p.add_argument("--frozen-head", action="store_true",
                   help="head weight not trained: op level, no weight gradient; end to end, "
                        "LoRA with a frozen head (default: trained head, full fine-tuning)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--layers", type=_positive("--layers"), default=2,
                   help="decoder layers of the end-to-end model (default: 2)")
    p.add_argument("--reps", type=_positive("--reps"), default=3,
                   help="timed runs per case, after one warm-up (default: 3)")
    p.add_argument("--no-e2e", action="store_true", help="op level only")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
