"""``cpo-fast bench``: op-level and end-to-end comparison on your own shapes and device.

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
benchmarks/bench_e2e.py uses the same machinery (``run_isolated``, ``e2e_case``,
``probe_case``) for its grid and its largest-batch search (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

from cpo_fast import _measure

MiB = 1 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# End-to-end paths: name -> what it computes (docs/benchmarks.md, "bench_e2e").
PATHS = {
    "eager": "(a) HF logits, .float().log_softmax(-1).gather(-1, y)",
    "trl-selective": "(b) HF logits, trl selective_log_softmax",
    "trl-fused-head": "(b) trl add_fused_lm_head, model(..., fused_lm_head=True).log_probs",
    "compile": "(c) HF logits, torch.compile(log_softmax + gather)",
    "liger": "(d) backbone hidden, Liger liger_fused_linear_cross_entropy (reduction='none')",
    "cce": "(d) backbone hidden, Cut Cross-Entropy linear_cross_entropy (reduction='none')",
    "cpo_fast": "(e) backbone hidden, cpo_fast fused linear (logits never built)",
}
GPU_ONLY = ("liger", "cce")  # Triton-GPU-only peers
OP_VARIANTS = ("eager", "cpo_fast-logits", "cpo_fast-linear", "trl-selective", "trl-fused-head")
IGNORE = -100


# ---- isolation: one fresh process per case ------------------------------------------------

_PRELOAD = ["torch", "cpo_fast", "cpo_fast.ops", "transformers",
            "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
            "peft", "trl.trainer.utils"]


def _serve() -> None:
    """The fork server: import everything once, then fork one child per case.

    Protocol (one JSON line each way): in ``{"fn", "case", "out", "timeout"}``; out
    ``{"exitcode", "signal", "timed_out"}``. The child writes its row to ``out``. The server
    only imports (no torch op runs in it), so each child starts with a clean allocator, no
    OpenMP pool and no CUDA context, and its peak RSS is its own; importing transformers
    takes seconds, which a plain subprocess per case would pay every time.
    """
    import importlib
    import signal

    _die_with_parent()
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110  (an optional peer; the case reports it)
            pass
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a case prints goes to stderr, never into the protocol
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            code = 0
            try:
                _child(req["fn"], req["case"], req["out"])
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        deadline = None if req.get("timeout") is None else time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        proto.write(json.dumps({"exitcode": code, "signal": sig, "timed_out": timed_out}) + "\n")
        proto.flush()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (no orphaned server or case)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _child(fn_name: str, case: dict, out_path: str | None) -> dict:
    try:
        out = globals()[fn_name](case)
    except torch.OutOfMemoryError:
        out = {**case, "status": "oom"}
    except Exception as e:  # noqa: BLE001  (reported as the row's status, never fatal)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out = {**case, "status": f"error: {type(e).__name__}: {msg}"[:300],
               "traceback": traceback.format_exc()[-2000:]}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f)
    return out


class _Server:
    proc = None

    @classmethod
    def get(cls):
        if cls.proc is None or cls.proc.poll() is not None:
            import atexit
            import subprocess

            quiet = os.environ.get("CPO_FAST_BENCH_VERBOSE") is None
            # NVML-based device checks: an import that asks torch.cuda.is_available() must
            # not initialize the CUDA driver in the server, or its forked children cannot
            # use CUDA.
            env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
            cls.proc = subprocess.Popen(
                [sys.executable, "-c", "from cpo_fast.bench import _serve; _serve()"],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL if quiet else None, text=True, bufsize=1)
            atexit.register(cls.close)
        return cls.proc

    @classmethod
    def close(cls):
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            cls.proc.wait(timeout=30)
        cls.proc = None


def run_isolated(fn_name: str, case: dict, *, timeout: float | None = None,
                 isolate: bool = True) -> dict:
    """Run ``fn_name(case)`` (a function of this module) in a fresh process.

    Each case is a fork of one server process that has imported torch, transformers, peft
    and trl once (:func:`_serve`). The row comes back with a ``status``; a child killed by
    the OS (SIGKILL: out of memory) gives ``oom``, one past ``timeout`` seconds
    ``error: timeout``. ``isolate=False`` runs it in this process.
    """
    if not isolate:
        out = _child(fn_name, case, None)
        return out
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        srv = _Server.get()
        srv.stdin.write(json.dumps({"fn": fn_name, "case": case, "out": path,
                                    "timeout": timeout}) + "\n")
        srv.stdin.flush()
        line = srv.stdout.readline()
        if not line:
            return {**case, "status": "error: the benchmark server died"}
        st = json.loads(line)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return json.load(f)
    if st["timed_out"]:
        return {**case, "status": f"error: timeout after {timeout:.0f} s"}
    if st["signal"] == 9:
        return {**case, "status": "oom"}
    return {**case, "status": f"error: exit code {st['exitcode']}, signal {st['signal']}"}


# ---- models --------------------------------------------------------------------------------

def build_model(family: str, vocab: int, hidden: int, layers: int, finetune: str, path: str,
                dtype: torch.dtype, device: str, seed: int = 0):
    """A tiny HF causal LM built from its config (never downloaded), ready to train.

    family 'llama' | 'qwen2'; untied head; heads of 64 dims (at least 1), grouped-query
    attention 4:1; finetune 'lora' (peft, r=16 on every projection: head and embeddings
    frozen) or 'full' (everything trained). TRL's fused head is added before peft wraps
    the model, as TRL says.
    """
    import transformers

    torch.manual_seed(seed)
    if hidden % 2:
        raise ValueError(f"--hidden must be even for a rotary-attention model, got {hidden}")
    heads = max(1, hidden // 64)
    while hidden % heads or (hidden // heads) % 2:
        heads -= 1
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=4096, tie_word_embeddings=False)
    if family == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=int(3.5 * hidden), **kw)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(intermediate_size=int(5.25 * hidden), **kw)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    model = cls(cfg).to(device=device, dtype=dtype)
    if path == "trl-fused-head":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if finetune == "lora":
        import peft

        lcfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(model, lcfg)
    elif finetune != "full":
        raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    model.train()
    return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 1):
    """Random token ids [B, T], an all-ones mask and HF labels (unshifted; the first quarter
    of each row is a prompt, labelled -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE
    return ids, torch.ones_like(ids), labels


def _logsoftmax_gather(logits, y):
    return logits.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def token_logprobs_fn(path: str, model):
    """fn(ids, mask, labels) -> per-token log-probs [B, T-1] (0 where labels[:, 1:] == -100
    is not guaranteed: the loss masks them) for one e2e path."""
    if path in ("eager", "trl-selective", "compile"):
        if path == "eager":
            head = _logsoftmax_gather
        elif path == "compile":
            head = torch.compile(_logsoftmax_gather, dynamic=False)
        else:
            from trl.trainer.utils import selective_log_softmax as head

        def fn(ids, mask, labels):
            logits = model(input_ids=ids, attention_mask=mask).logits
            return head(logits[:, :-1], labels[:, 1:].clamp(min=0))
        return fn
    if path == "trl-fused-head":
        def fn(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels,
                         fused_lm_head=True).log_probs
        return fn
    if path == "cpo_fast":
        import cpo_fast

        if hasattr(cpo_fast, "causal_lm_token_logprobs"):
            def fn(ids, mask, labels):
                return cpo_fast.causal_lm_token_logprobs(model, ids, labels, attention_mask=mask)
            return fn
        base = _base(model)

        def fn(ids, mask, labels):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            return cpo_fast.linear_token_logprobs(hidden[:, :-1], base.lm_head.weight,
                                                  labels[:, 1:])
        return fn
    if path in GPU_ONLY:
        base = _base(model)
        if path == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            def nll(h, w, y):
                return liger_fused_linear_cross_entropy(h, w, y, reduction="none")
        else:
            from cut_cross_entropy import linear_cross_entropy

            def nll(h, w, y):
                return linear_cross_entropy(h, w, y, reduction="none")

        def fn(ids, mask, labels):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            y = labels[:, 1:].reshape(-1)
            return -nll(h, base.lm_head.weight, y).float().view(labels.shape[0], -1)
        return fn
    raise ValueError(f"unknown path {path!r}; one of {', '.join(PATHS)}")


def train_step_fn(model, path: str, ids, mask, labels):
    """One training step: loss = -mean log-prob over the labelled tokens, backward, AdamW
    (``fused=True``: one kernel over all parameters, the same for every path)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # the fast kernel, CPU and CUDA
    lp_fn = token_logprobs_fn(path, model)
    keep = labels[:, 1:] != IGNORE
    count = keep.sum().clamp(min=1)

    def step():
        lp = lp_fn(ids, mask, labels)
        loss = -(lp * keep).sum() / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def init_state():  # AdamW's state, as after a first step (zero gradients, lr 0)
        for p in params:
            p.grad = torch.zeros_like(p)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)

    step.init_state = init_state
    return step


# ---- cases (each runs in a fresh process) -------------------------------------------------

def _device_ok(case: dict) -> str | None:
    if case["path"] in GPU_ONLY and not str(case["device"]).startswith("cuda"):
        return "n/a (Triton GPU only)"
    return None


def _timed_with_memory(step, device: str, reps: int) -> tuple[dict, int | None]:
    """Time ``reps`` calls of step(); the peak extra memory is taken over the first."""
    times, peak = [], None
    for i in range(reps):
        _measure.sync(device)
        if i == 0:
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = _measure.rss_bytes("VmRSS") if _measure.reset_peak_rss() else None
        t0 = time.perf_counter()
        step()
        _measure.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if i == 0:
            if str(device).startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() - base
            elif base is not None:
                peak = _measure.rss_bytes("VmHWM") - base
    return _measure.summarize(times), peak


def _mem_now(device: str) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated()
    return _measure.rss_bytes("VmRSS")


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
    _measure.sync(dev)
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
            _measure.sync(dev)
            steps[path] = step
            out[path] = {"warmup_s": time.perf_counter() - t0, "times_ms": []}
        except Exception as e:  # noqa: BLE001  (one path failing leaves the others)
            out[path] = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}
    order = list(steps)
    for r in range(case["reps"]):
        k = r % max(1, len(order))
        for path in order[k:] + order[:k]:
            _measure.sync(dev)
            t0 = time.perf_counter()
            steps[path]()
            _measure.sync(dev)
            out[path]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    tokens = case["batch"] * case["seq"]
    for path in order:
        t = _measure.summarize(out[path].pop("times_ms"))
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
        peak = _measure.peak_extra_memory(step, dev)
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
    import cpo_fast

    if variant == "eager":
        return lambda h, w, y: _logsoftmax_gather(h @ w.T, y)
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


# ---- the command --------------------------------------------------------------------------

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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
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


def environment(device: str) -> dict:
    """Device, versions and load, as the benchmark records carry them."""
    import importlib.metadata as md

    def ver(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f
                             if ln.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores)"
    return {"device": name, "device_type": "cuda" if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": ver("triton"), "cpo_fast": ver("cpo_fast"),
            "transformers": ver("transformers"), "peft": ver("peft"), "trl": ver("trl"),
            "loadavg": list(os.getloadavg())}


def run_bench(args: argparse.Namespace, *, isolate: bool = True) -> dict:
    """Every op-level and end-to-end case of ``cpo-fast bench``; the record it prints."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {device!r}")
    if not args.no_e2e and args.hidden % 2:
        raise ValueError(f"--hidden must be even for the end-to-end model (got {args.hidden}); "
                         "or pass --no-e2e")
    has_trl = _has("trl")
    base = {"device": device, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden}
    ops = []
    for v in OP_VARIANTS:
        case = {**base, "kind": "op", "variant": v, "tokens": args.tokens,
                "frozen_head": args.frozen_head, "warmup": 1, "reps": args.reps}
        if v.startswith("trl") and not has_trl:
            ops.append({**case, "status": "skipped: trl not installed"})
            continue
        ops.append(run_isolated("op_case", case, isolate=isolate))
    e2e = []
    if not args.no_e2e:
        seq = min(args.seq, args.tokens)
        batch = max(1, args.tokens // seq)
        for path in ("eager", "trl-fused-head", "cpo_fast"):
            case = {**base, "kind": "e2e", "family": "llama", "layers": args.layers,
                    "finetune": "lora" if args.frozen_head else "full", "path": path,
                    "batch": batch, "seq": seq, "warmup": 1, "reps": args.reps}
            if path.startswith("trl") and not has_trl:
                e2e.append({**case, "status": "skipped: trl not installed"})
                continue
            e2e.append(run_isolated("e2e_case", {**case, "reps": 1}, isolate=isolate))
        # Memory above, one fresh process per path; timing here, the paths interleaved
        # in one process so that a change of load hits them alike (bench_e2e.py does the same).
        timed = [r["path"] for r in e2e if r["status"] == "ok"]
        if timed:
            res = run_isolated("interleaved_case", {**e2e[0], "paths": timed, "reps": args.reps},
                               isolate=isolate)
            for r in e2e:
                t = (res.get("timings") or {}).get(r["path"])
                if r["path"] in timed:
                    for k in ("median_ms", "p20_ms", "p80_ms", "min_ms", "iters", "times_ms",
                              "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80"):
                        r.pop(k, None)
                    if t and t.get("status") == "ok":
                        r.update({k: v for k, v in t.items() if k != "status"}, reps=args.reps)
                    else:
                        r["status"] = f"timing {(t or res).get('status')}"
    for rows, key in ((ops, "eager"), (e2e, "eager")):
        ref = next((r for r in rows if r.get("variant", r.get("path")) == key
                    and "median_ms" in r), None)
        for r in rows:
            r.pop("traceback", None)
            if ref and "median_ms" in r:
                r["speedup_vs_eager"] = ref["median_ms"] / r["median_ms"]
                if r.get("peak_extra_bytes") is not None and ref.get("peak_extra_bytes"):
                    r["mem_vs_eager"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]
    return {"schema": "cpo_fast-bench-cli/1",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(device),
            "settings": {k: getattr(args, k) for k in ("vocab", "hidden", "tokens", "seq", "dtype",
                                                       "frozen_head", "layers", "reps")}
            | {"device": device},
            "op": ops, "e2e": e2e}


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _ms(r: dict) -> str:
    if "median_ms" not in r:
        return str(r.get("status"))
    return f"{r['median_ms']:.1f} [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}]"


def _mib(b) -> str:
    return "-" if b is None else f"{max(b, 0) / MiB:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(record: dict) -> str:
    """The human-readable tables of a ``cpo-fast bench`` record."""
    st, env = record["settings"], record["environment"]
    lines = [f"cpo-fast bench: V={st['vocab']}, d={st['hidden']}, N={st['tokens']}, {st['dtype']}, "
             f"head {'frozen' if st['frozen_head'] else 'trained'}, on {env['device']} "
             f"(torch {env['torch']}, trl {env.get('trl')}; load {env['loadavg'][0]:.2f})",
             "time: median [p20, p80] of the timed runs; memory: peak extra of one call "
             "(peak RSS growth on the CPU, allocator peak on CUDA)", "",
             "op level: fwd+bwd of sum(g * logp) from hidden [N, d] and W [V, d] (head matmul "
             "included)", ""]
    head = ["variant", "ms [p20, p80]", "vs eager", "peak extra MiB", "mem vs eager"]
    rows = [[r["variant"], _ms(r), _x(r.get("speedup_vs_eager")), _mib(r.get("peak_extra_bytes")),
             "-" if r.get("mem_vs_eager") is None else f"{r['mem_vs_eager']:.2f}"]
            for r in record["op"]]
    lines += _table(head, rows)
    if record["e2e"]:
        r0 = record["e2e"][0]
        lines += ["", f"end to end: one training step (fwd, bwd, AdamW) of a {r0['layers']}-layer "
                  f"Llama-config model, {r0['finetune']} fine-tuning, batch {r0['batch']} x "
                  f"{r0['seq']} tokens", ""]
        head = ["path", "step ms [p20, p80]", "tokens/s", "vs eager", "peak extra MiB",
                "mem vs eager"]
        rows = [[r["path"], _ms(r), f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-",
                 _x(r.get("speedup_vs_eager")), _mib(r.get("peak_extra_bytes")),
                 "-" if r.get("mem_vs_eager") is None else f"{r['mem_vs_eager']:.2f}"]
                for r in record["e2e"]]
        lines += _table(head, rows)
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w, strict=True)).rstrip()
    return [fmt(head), fmt(["-" * n for n in w]), *(fmt(r) for r in rows)]


def main(args: argparse.Namespace) -> int:
    record = run_bench(args)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print(render(record))
    sys.stdout.flush()
    return 0
