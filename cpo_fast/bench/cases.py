"""The benchmark cases: each a function of a JSON-able dict returning its row.

Each runs in a fresh process (cpo_fast.bench.isolation.run_isolated): ``op_case`` one
op-level variant, ``e2e_case`` one end-to-end path (time and memory), ``interleaved_case``
several paths timed in turns, ``probe_case`` whether one training step fits a memory budget.
"""

from __future__ import annotations

import time

import torch

import cpo_fast
from cpo_fast.bench import measure
from cpo_fast.bench.e2e import (
    DTYPES,
    GPU_ONLY,
    build_model,
    logsoftmax_gather,
    make_batch,
    train_step_fn,
)

OP_VARIANTS = ("eager", "cpo_fast-logits", "cpo_fast-linear", "trl-selective", "trl-fused-head")


def _device_ok(case: dict) -> str | None:
    if case["path"] in GPU_ONLY and not str(case["device"]).startswith("cuda"):
        return "n/a (Triton GPU only)"
    return None


def _timed_with_memory(step, device: str, reps: int) -> tuple[dict, int | None]:
    """Time ``reps`` calls of step(); the peak extra memory is taken over the first."""
    times, peak = [], None
    for i in range(reps):
        measure.sync(device)
        if i == 0:
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = measure.rss_bytes("VmRSS") if measure.reset_peak_rss() else None
        t0 = time.perf_counter()
        step()
        measure.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if i == 0:
            if str(device).startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() - base
            elif base is not None:
                peak = measure.rss_bytes("VmHWM") - base
    return measure.summarize(times), peak


def _mem_now(device: str) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated()
    return measure.rss_bytes("VmRSS")


def e2e_case(case: dict) -> dict:
    """One (family, V, finetune, path) at batch x seq: warm-up, then ``reps`` timed steps.

    Row: tokens/s (B*T tokens per step: median of the steps, p20/p80 from the step
    times' p80/p20), the step's peak extra memory (over the first timed step, beyond the
    weights, optimizer state and everything else that existed before it), the model state
    (memory growth from before the model was built to after warm-up: weights, optimizer
    state), and the warm-up time (which for 'compile' includes compiling).
    """
    na = _device_ok(case)
    if na:
        return {**case, "status": na}
    dev, dtype = case["device"], DTYPES[case["dtype"]]
    torch.set_grad_enabled(True)
    m0 = _mem_now(dev)
    model = build_model(case["family"], case["vocab"], case["hidden"], case["layers"],
                        case["finetune"], case["path"], dtype, dev)
    ids, mask, labels = make_batch(case["batch"], case["seq"], case["vocab"], dev)
    step = train_step_fn(model, case["path"], ids, mask, labels)
    t0 = time.perf_counter()
    losses = [float(step()) for _ in range(case.get("warmup", 1))]
    measure.sync(dev)
    warm_s = time.perf_counter() - t0
    state = _mem_now(dev) - m0
    timing, peak = _timed_with_memory(step, dev, case["reps"])
    tokens = case["batch"] * case["seq"]
    tps = {"tokens_per_s": tokens / (timing["median_ms"] / 1e3),
           "tokens_per_s_p20": tokens / (timing["p80_ms"] / 1e3),
           "tokens_per_s_p80": tokens / (timing["p20_ms"] / 1e3)}
    return {**case, "status": "ok", **timing, **tps, "peak_extra_bytes": peak,
            "state_bytes": state, "warmup_s": warm_s,
            "loss": losses[0], "loss_step": 1}  # the first step's: before any update


def interleaved_case(case: dict) -> dict:
    """Time several paths of one (family, V, finetune) in one process, interleaved.

    Every path gets its own model, optimizer and batch (the same seed, so the same loss);
    after ``warmup`` steps each (compile: one more), ``reps`` rounds run one timed step of
    every path, the order rotated each round. A change of the machine's load during the
    measurement (other jobs starting or stopping) then hits every path alike, which
    timing the paths one after another in separate processes does not ensure. Memory is
    not measured here (several models live in this process): ``e2e_case`` does that, in a
    fresh process per path. Returns ``{"timings": {path: row fields}}``.
    """
    dev, dtype = case["device"], DTYPES[case["dtype"]]
    torch.set_grad_enabled(True)
    steps, out = {}, {}
    for path in case["paths"]:
        try:
            model = build_model(case["family"], case["vocab"], case["hidden"], case["layers"],
                                case["finetune"], path, dtype, dev)
            ids, mask, labels = make_batch(case["batch"], case["seq"], case["vocab"], dev)
            step = train_step_fn(model, path, ids, mask, labels)
            t0 = time.perf_counter()
            for _ in range(case["warmup"] + (1 if path == "compile" else 0)):
                step()
            measure.sync(dev)
            steps[path] = step
            out[path] = {"warmup_s": time.perf_counter() - t0, "times_ms": []}
        except Exception as e:  # noqa: BLE001  (one path failing leaves the others)
            out[path] = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}
    order = list(steps)
    for r in range(case["reps"]):
        k = r % max(1, len(order))
        for path in order[k:] + order[:k]:
            measure.sync(dev)
            t0 = time.perf_counter()
            steps[path]()
            measure.sync(dev)
            out[path]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    tokens = case["batch"] * case["seq"]
    for path in order:
        t = measure.summarize(out[path].pop("times_ms"))
        out[path].update(t, status="ok", tokens_per_s=tokens / (t["median_ms"] / 1e3),
                         tokens_per_s_p20=tokens / (t["p80_ms"] / 1e3),
                         tokens_per_s_p80=tokens / (t["p20_ms"] / 1e3))
    return {**case, "status": "ok", "timings": out}


def probe_case(case: dict) -> dict:
    """Does one training step at ``batch`` fit ``budget_bytes`` of peak extra memory?

    The optimizer state is created first (one AdamW step on zero gradients), so that, as in
    a running training loop, it exists before the step and is not counted; 'compile' runs a
    warm-up step at the probed batch (which it compiles for). Then one step at the probed
    batch, whose peak extra memory is compared with the budget.
    """
    na = _device_ok(case)
    if na:
        return {**case, "status": na}
    dev, dtype = case["device"], DTYPES[case["dtype"]]
    model = build_model(case["family"], case["vocab"], case["hidden"], case["layers"],
                        case["finetune"], case["path"], dtype, dev)
    batch = make_batch(case["batch"], case["seq"], case["vocab"], dev)
    step = train_step_fn(model, case["path"], *batch)
    if case["path"] == "compile":
        step()
    else:
        step.init_state()
    try:
        peak = measure.peak_extra_memory(step, dev)
    except torch.OutOfMemoryError:
        return {**case, "status": "ok", "fits": False, "peak_extra_bytes": None}
    return {**case, "status": "ok", "peak_extra_bytes": peak,
            "fits": peak is not None and peak <= case["budget_bytes"]}


def op_case(case: dict) -> dict:
    """One op-level variant: fwd+bwd of sum(g * logp) from hidden [N, d] and weight [V, d]."""
    dev, dtype = case["device"], DTYPES[case["dtype"]]
    N, d, V = case["tokens"], case["hidden"], case["vocab"]
    torch.manual_seed(0)
    h0 = torch.randn(N, d, device=dev).to(dtype)
    w0 = (torch.randn(V, d, device=dev) / d**0.5 * 2).to(dtype)
    y = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    fn = _op_fn(case["variant"])
    if fn is None:
        return {**case, "status": "skipped: trl not installed"}
    train_w = not case["frozen_head"]

    def step():
        h = h0.detach().requires_grad_(True)
        w = w0.detach().requires_grad_(train_w)
        lp = fn(h, w, y)
        return torch.autograd.grad((lp.float() * g).sum(), [h, w] if train_w else [h])

    for _ in range(case["warmup"]):
        step()
    timing, peak = _timed_with_memory(step, dev, case["reps"])
    return {**case, "status": "ok", **timing, "peak_extra_bytes": peak}


def _op_fn(variant: str):
    if variant == "eager":
        return lambda h, w, y: logsoftmax_gather(h @ w.T, y)
    if variant == "cpo_fast-logits":
        return lambda h, w, y: cpo_fast.token_logprobs(h @ w.T, y)
    if variant == "cpo_fast-linear":
        return lambda h, w, y: cpo_fast.linear_token_logprobs(h, w, y)
    try:
        import trl.trainer.utils as tu
    except ImportError:
        return None
    if variant == "trl-selective":
        return lambda h, w, y: tu.selective_log_softmax(h @ w.T, y)
    if variant == "trl-fused-head":
        # The chunked function TRL's add_fused_lm_head calls (a private name of trl 1.16).
        chunked = tu._ChunkedLogProbFunction
        size = tu._CHUNKED_LOGPROB_CHUNK_SIZE
        return lambda h, w, y: chunked.apply(h, w, None, y, 1.0, size)[0]
    raise ValueError(f"unknown op variant {variant!r}")

