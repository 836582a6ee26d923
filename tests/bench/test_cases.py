"""The benchmark cases (cpo_fast/bench/cases.py), called directly in this process. With the
model, batch and step faked and a fake clock: ``e2e_case``, ``op_case`` and
``interleaved_case`` turn known step times into the row's timing fields and tokens/s (checked
by hand), only the timed calls are timed, the interleaved order rotates each round, a failing
path leaves the others; ``probe_case`` prepares the optimizer state (or compiles) before its
measured step and reports fit / no fit / out of memory. With a real tiny model: each op
variant computes the log-probs of a float64 reference, and ``e2e_case`` / ``probe_case`` /
``interleaved_case`` run end to end, the first step's loss matching an independent one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cpo_fast.bench import cases as C  # noqa: E402
from cpo_fast.bench import e2e  # noqa: E402
from cpo_fast.constants import IGNORE_INDEX  # noqa: E402

E2E = dict(family="llama", vocab=64, hidden=64, layers=1, finetune="full", dtype="fp32",
           device="cpu", batch=2, seq=8)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(C.time, "perf_counter", c)
    return c


@pytest.fixture
def fake_model(monkeypatch, clock):
    """build_model / make_batch / train_step_fn faked: each path's step takes the seconds
    listed for it (in order), returns a loss tensor and logs what was called."""
    log, durations = [], {}

    def build_model(family, vocab, hidden, layers, finetune, path, dtype, device):
        log.append(("build", path))
        return path

    def train_step_fn(model, path, ids, mask, labels):
        if path == "broken":
            raise RuntimeError("no such kernel\nmore")

        def step():
            log.append(("step", path))
            clock.t += durations[path].pop(0)
            return torch.tensor(2.5)

        step.init_state = lambda: log.append(("init", path))
        return step

    monkeypatch.setattr(C, "build_model", build_model)
    monkeypatch.setattr(C, "make_batch", lambda *a: (None, None, None))
    monkeypatch.setattr(C, "train_step_fn", train_step_fn)
    return log, durations


def test_e2e_case_row_from_known_step_times(fake_model):
    log, durations = fake_model
    durations["eager"] = [0.5, 0.004, 0.002, 0.008]  # warm-up, then 3 timed steps (s)
    case = {**E2E, "path": "eager", "warmup": 1, "reps": 3, "batch": 4, "seq": 16}
    row = C.e2e_case(case)
    assert row["status"] == "ok" and {k: row[k] for k in case} == case
    assert row["times_ms"] == pytest.approx([4.0, 2.0, 8.0])
    assert row["median_ms"] == pytest.approx(4.0) and row["min_ms"] == pytest.approx(2.0)
    p20, p80 = np.percentile([4.0, 2.0, 8.0], [20, 80])  # 2.8, 6.4
    assert row["p20_ms"] == pytest.approx(p20) and row["p80_ms"] == pytest.approx(p80)
    tokens = 4 * 16
    assert row["tokens_per_s"] == pytest.approx(tokens / 0.004)
    assert row["tokens_per_s_p20"] == pytest.approx(tokens / (p80 / 1e3))  # from the slow end
    assert row["tokens_per_s_p80"] == pytest.approx(tokens / (p20 / 1e3))
    assert row["warmup_s"] == pytest.approx(0.5)
    assert row["loss"] == 2.5 and row["loss_step"] == 1
    assert isinstance(row["state_bytes"], int)
    assert log == [("build", "eager")] + [("step", "eager")] * 4


def test_gpu_only_paths_are_not_applicable_on_cpu(fake_model):
    log, _ = fake_model
    for fn in (C.e2e_case, C.probe_case):
        for path in e2e.GPU_ONLY:
            row = fn({**E2E, "path": path, "reps": 1, "budget_bytes": 1})
            assert row["status"] == "n/a (Triton GPU only)" and row["path"] == path
    assert log == []  # nothing built
    assert C._device_ok({"path": "liger", "device": "cuda:0"}) is None
    assert C._device_ok({"path": "eager", "device": "cpu"}) is None


def test_interleaved_rotates_the_order_and_survives_a_failing_path(fake_model):
    log, durations = fake_model
    durations.update(a=[0.1] + [0.001, 0.002, 0.003], b=[0.2] + [0.010, 0.010, 0.040],
                     compile=[0.3, 0.3] + [0.005, 0.006, 0.007])
    case = {**E2E, "paths": ["a", "broken", "b", "compile"], "warmup": 1, "reps": 3}
    row = C.interleaved_case(case)
    assert row["status"] == "ok" and row["paths"] == case["paths"]
    t = row["timings"]
    assert t["broken"] == {"status": "error: RuntimeError: no such kernel\nmore"}
    steps = [p for kind, p in log if kind == "step"]
    # warm-up: one step each, 'compile' one more; then rounds of all paths, rotated by one
    assert steps[:4] == ["a", "b", "compile", "compile"]
    assert steps[4:] == ["a", "b", "compile", "b", "compile", "a", "compile", "a", "b"]
    tokens = E2E["batch"] * E2E["seq"]
    assert t["a"]["median_ms"] == pytest.approx(2.0) and t["a"]["iters"] == 3
    assert t["b"]["median_ms"] == pytest.approx(10.0)
    assert t["b"]["p80_ms"] == pytest.approx(np.percentile([10, 10, 40], 80))
    assert t["compile"]["warmup_s"] == pytest.approx(0.6)
    for p in ("a", "b", "compile"):
        assert t[p]["status"] == "ok"
        assert t[p]["tokens_per_s"] == pytest.approx(tokens / (t[p]["median_ms"] / 1e3))
        assert t[p]["tokens_per_s_p20"] == pytest.approx(tokens / (t[p]["p80_ms"] / 1e3))


def test_probe_case_prepares_state_then_measures(fake_model, monkeypatch):
    log, durations = fake_model
    peaks = iter([5000, 5000, 123])
    monkeypatch.setattr(C.measure, "peak_extra_memory", lambda fn, dev: (fn(), next(peaks))[1])
    durations.update(eager=[0.0] * 3, compile=[0.0] * 2)
    r = C.probe_case({**E2E, "path": "eager", "budget_bytes": 5000})
    assert (r["status"], r["fits"], r["peak_extra_bytes"]) == ("ok", True, 5000)
    assert log == [("build", "eager"), ("init", "eager"), ("step", "eager")]
    assert C.probe_case({**E2E, "path": "eager", "budget_bytes": 4999})["fits"] is False
    log.clear()
    r = C.probe_case({**E2E, "path": "compile", "budget_bytes": 100})
    assert r["fits"] is False and r["peak_extra_bytes"] == 123
    # compile: a warm-up step at the probed batch (it compiles for it), no init_state
    assert log == [("build", "compile"), ("step", "compile"), ("step", "compile")]


def test_probe_case_out_of_memory_and_unmeasurable(fake_model, monkeypatch):
    _, durations = fake_model
    durations["eager"] = [0.0] * 3

    def oom(fn, dev):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(C.measure, "peak_extra_memory", oom)
    r = C.probe_case({**E2E, "path": "eager", "budget_bytes": 1 << 40})
    assert (r["status"], r["fits"], r["peak_extra_bytes"]) == ("ok", False, None)
    monkeypatch.setattr(C.measure, "peak_extra_memory", lambda fn, dev: None)
    r = C.probe_case({**E2E, "path": "eager", "budget_bytes": 1 << 40})
    assert r["fits"] is False and r["peak_extra_bytes"] is None


OP = dict(device="cpu", dtype="fp32", tokens=6, hidden=8, vocab=20, frozen_head=False,
          warmup=2, reps=3)


def test_op_case_times_only_the_timed_calls_and_freezes_the_head(monkeypatch, clock):
    seen = []
    durations = iter([1.0, 1.0, 0.003, 0.001, 0.002])

    def fn(h, w, y):
        seen.append((tuple(h.shape), tuple(w.shape), h.requires_grad, w.requires_grad))
        clock.t += next(durations)
        return (h @ w.T).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    monkeypatch.setattr(C, "_op_fn", lambda variant: fn)
    row = C.op_case({**OP, "variant": "x"})
    assert row["status"] == "ok" and row["variant"] == "x"
    assert row["times_ms"] == pytest.approx([3.0, 1.0, 2.0]) and row["median_ms"] == pytest.approx(2.0)
    assert seen == [((6, 8), (20, 8), True, True)] * 5
    seen.clear()
    durations = iter([0.0] * 5)
    C.op_case({**OP, "variant": "x", "frozen_head": True})
    assert seen == [((6, 8), (20, 8), True, False)] * 5  # no weight gradient


def test_op_case_without_trl(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # import fails
    for v in ("trl-selective", "trl-fused-head"):
        row = C.op_case({**OP, "variant": v})
        assert row == {**OP, "variant": v, "status": "skipped: trl not installed"}


def test_op_case_unknown_variant():
    pytest.importorskip("trl")
    with pytest.raises(ValueError, match="unknown op variant 'nope'"):
        C.op_case({**OP, "variant": "nope"})


@pytest.mark.parametrize("variant", C.OP_VARIANTS)
def test_op_variants_compute_the_logprobs(variant):
    if variant.startswith("trl"):
        pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g)
    w = torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (6,), generator=g)
    ref = (h.double() @ w.double().T).log_softmax(-1)[torch.arange(6), y]
    torch.testing.assert_close(C._op_fn(variant)(h, w, y).double(), ref, atol=1e-5, rtol=1e-5)
    row = C.op_case({**OP, "variant": variant})
    assert row["status"] == "ok" and row["iters"] == 3 and len(row["times_ms"]) == 3
    assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert "peak_extra_bytes" in row


def _first_step_loss(path):
    model = e2e.build_model("llama", E2E["vocab"], E2E["hidden"], 1, "full", path, torch.float32, "cpu")
    ids, mask, labels = e2e.make_batch(E2E["batch"], E2E["seq"], E2E["vocab"], "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    keep = labels[:, 1:] != IGNORE_INDEX
    lp = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
    return float(-lp.squeeze(-1)[keep].mean())


@pytest.mark.parametrize("path", ["eager", "cpo_fast"])
def test_e2e_case_real_tiny_model(path):
    row = C.e2e_case({**E2E, "path": path, "warmup": 1, "reps": 2})
    assert row["status"] == "ok" and row["iters"] == 2 and row["loss_step"] == 1
    assert row["loss"] == pytest.approx(_first_step_loss(path), rel=1e-5)
    tokens = E2E["batch"] * E2E["seq"]
    assert row["tokens_per_s"] == pytest.approx(tokens / (row["median_ms"] / 1e3))
    assert isinstance(row["peak_extra_bytes"], int) and isinstance(row["state_bytes"], int)


def test_probe_and_interleaved_real_tiny_model():
    case = {**E2E, "path": "cpo_fast"}
    big = C.probe_case({**case, "budget_bytes": 1 << 40})
    assert big["status"] == "ok" and isinstance(big["peak_extra_bytes"], int)
    assert big["fits"] is True
    assert C.probe_case({**case, "budget_bytes": -1})["fits"] is False
    row = C.interleaved_case({**E2E, "paths": ["eager", "cpo_fast"], "warmup": 1, "reps": 2})
    for p in ("eager", "cpo_fast"):
        t = row["timings"][p]
        assert t["status"] == "ok" and t["iters"] == 2 and len(t["times_ms"]) == 2
