"""Ahead-of-time GPU builds (cpo_fast/bench/aot.py). Pure Python, always: the occupancy model
against a brute-force count and hand-worked cases (each limit binding once), the PTX feature
counts and the ``ptxas -v`` parsing on canned text (with the ptxas command line it builds),
``Launch.key`` / ``constants``, ``run_quietly``, ``ptxas_path`` and ``capture`` refusing the
interpreter. With the wheel's ptxas present: a subprocess (TRITON_INTERPRET unset) captures a
tiny kernel's launches on meta tensors, one per autotune config, and builds them for sm_80 and
sm_90a; skipped with the reason when the toolchain is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
from conftest import ROOT, compiler_env, gpu_toolchain_missing

from cpo_fast.bench import aot

# ---- occupancy -----------------------------------------------------------------------------


def _brute_force_ctas(regs, smem, warps, cc):
    """The largest n CTAs of ``warps`` warps that fit every per-SM limit at once."""
    a = aot.ARCH[cc]
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    n = 0
    while (n + 1 <= a["ctas"] and (n + 1) * warps <= a["warps"]
           and (n + 1) * warps * per_warp <= a["regs"]
           and (n + 1) * (smem + 1024) <= a["smem_sm"]):
        n += 1
    return n


@pytest.mark.parametrize("regs, smem, warps, cc, ctas", [
    (128, 0, 4, 80, 4),         # registers: 4096 / warp -> 16 warps -> 4 CTAs
    (255, 0, 4, 80, 2),         # 255 regs round up to 256/thread: 8192 / warp -> 8 warps
    (32, 100_000, 4, 80, 1),    # shared memory: 167936 // 101024
    (32, 100_000, 4, 90, 2),    # sm_90a has more: 233472 // 101024
    (16, 0, 8, 90, 8),          # warps: 64 // 8
    (1, 0, 1, 80, 32),          # the CTA cap
])
def test_occupancy_hand_worked(regs, smem, warps, cc, ctas):
    occ = aot.occupancy(regs, smem, warps, cc)
    assert occ == {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps}


def test_occupancy_against_brute_force():
    for cc in aot.ARCH:
        for regs in (1, 24, 40, 64, 65, 96, 168, 255):
            for smem in (0, 16_384, 49_152, 98_304, 160_000):
                for warps in (1, 2, 4, 8, 16):
                    got = aot.occupancy(regs, smem, warps, cc)["ctas_per_sm"]
                    assert got == _brute_force_ctas(regs, smem, warps, cc), (regs, smem, warps, cc)


def test_arch_table():
    assert {cc: a["name"] for cc, a in aot.ARCH.items()} == {80: "sm_80", 90: "sm_90a",
                                                             100: "sm_100a"}
    for a in aot.ARCH.values():
        assert a["smem_block"] == a["smem_sm"] - 1024  # one CTA's opt-in max: the SM's minus 1 KB


# ---- PTX and ptxas -------------------------------------------------------------------------

PTX = textwrap.dedent("""\
    // mma.sync in a comment is not an instruction
    .visible .entry k(
    \tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    \t@%p1 mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    \t@!%p12 wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;
    \twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;
    \twgmma.fence.sync.aligned;
    \tcp.async.ca.shared.global [%r1], [%rd1], 4;
    \t@%p3 cp.async.cg.shared.global [%r1], [%rd1], 16;
    \tcp.async.commit_group;
    \tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1];
    \ttcgen05.mma.cta_group::1.kind::f16 [%r1], %rd1, %rd2;
    """)


def test_ptx_features_counts_instructions_only():
    assert aot.ptx_features(PTX) == dict(mma=2, wgmma=2, tcgen05=1, cp_async=2, tma=1)
    assert aot.ptx_features("") == dict(mma=0, wgmma=0, tcgen05=0, cp_async=0, tma=0)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_linear_token_logprobs_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _linear_token_logprobs_fwd_kernel
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 24 bytes cumulative stack size, 560 bytes cmem[0]
"""


def _fake_ptxas(monkeypatch, log_out: str, log_err: str = ""):
    seen = {}

    def run(cmd, capture_output, text, check):
        seen["cmd"] = cmd
        with open(cmd[3]) as f:
            seen["ptx"] = f.read()
        return subprocess.CompletedProcess(cmd, 0, log_out, log_err)

    monkeypatch.setattr(aot, "_ptxas", lambda cc: f"/opt/ptxas-{cc}")
    monkeypatch.setattr(aot.subprocess, "run", run)
    return seen


def test_ptxas_report_parses_and_builds_the_command(monkeypatch):
    seen = _fake_ptxas(monkeypatch, "", PTXAS_LOG)  # ptxas -v writes its report to stderr
    res = aot.ptxas_report("// the ptx\n", 90)
    assert res == dict(regs=168, spill_store=8, spill_load=12, stack=24)
    cmd = seen["cmd"]
    assert cmd[:3] == ["/opt/ptxas-90", "-v", "--gpu-name=sm_90a"]
    assert cmd[3].endswith("k.ptx") and cmd[4] == "-o" and cmd[5].endswith("k.cubin")
    assert os.path.dirname(cmd[3]) == os.path.dirname(cmd[5])
    assert seen["ptx"] == "// the ptx\n"
    assert not os.path.exists(os.path.dirname(cmd[3]))  # the temporary folder is gone


def test_ptxas_report_zeros_when_nothing_reported(monkeypatch):
    seen = _fake_ptxas(monkeypatch, "ptxas info    : 0 bytes gmem\n")
    assert aot.ptxas_report("x", 80) == dict(regs=0, spill_store=0, spill_load=0, stack=0)
    assert seen["cmd"][2] == "--gpu-name=sm_80"


def test_ptxas_path(monkeypatch, tmp_path):
    exe = tmp_path / "ptxas"
    exe.write_text("")
    monkeypatch.setattr(aot, "_ptxas", lambda cc: str(exe))
    assert aot.ptxas_path(80) == str(exe)
    monkeypatch.setattr(aot, "_ptxas", lambda cc: str(tmp_path / "missing"))
    assert aot.ptxas_path(80) is None
    monkeypatch.setattr(aot, "_ptxas", lambda cc: "")
    assert aot.ptxas_path(80) is None

    def broken(cc):
        raise RuntimeError("no nvidia backend")

    monkeypatch.setattr(aot, "_ptxas", broken)
    assert aot.ptxas_path(90) is None


# ---- Launch, run_quietly, capture ----------------------------------------------------------


def _launch(**over):
    kernel = types.SimpleNamespace(arg_names=["x_ptr", "n", "BLOCK", "EVEN"])
    kw = dict(kernel=kernel, name="k", signature={"x_ptr": "*fp32", "n": "i32",
                                                  "BLOCK": "constexpr", "EVEN": "constexpr"},
              constexprs={(2,): 64, (3,): types.SimpleNamespace(value=True)},
              attrs={(0,): [["tt.divisibility", 16]], (1,): []},
              options={"num_warps": 4, "num_stages": 3, "num_ctas": 1})
    kw.update(over)
    return aot.Launch(**kw)


def test_launch_constants_by_name():
    assert _launch().constants() == {"BLOCK": 64, "EVEN": True}
    assert _launch(constexprs={2: 128}).constants() == {"BLOCK": 128}


def test_launch_key_identifies_a_build():
    a = _launch()
    b = _launch(constexprs={(3,): types.SimpleNamespace(value=True), (2,): 64},
                options={"num_stages": 3, "num_ctas": 1, "num_warps": 4}, tag="other caller")
    hash(a.key())
    assert a.key() == b.key()  # neither the dicts' order nor the tag matters
    assert _launch(options={"num_warps": 8, "num_stages": 3, "num_ctas": 1}).key() != a.key()
    assert _launch(constexprs={(2,): 128, (3,): True}).key() != a.key()
    assert _launch(attrs={(0,): [], (1,): []}).key() != a.key()
    assert _launch(name="other").key() != a.key()
    assert len({a.key(), _launch().key()}) == 1


def test_run_quietly():
    assert aot.run_quietly(lambda: 42) == (42, None)

    def fail():
        raise ValueError("first line\nthe line that says why")

    assert aot.run_quietly(fail) == (None, "ValueError: the line that says why")

    def long():
        raise RuntimeError("x" * 1000)

    res, err = aot.run_quietly(long)
    assert res is None and len(err) == 300 and err.startswith("RuntimeError: xxx")

    def empty():
        raise KeyError()

    assert aot.run_quietly(empty) == (None, "KeyError: ")


def test_capture_refuses_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with aot.capture(80):
            pass


# ---- a real capture and build (subprocess: the compiler, not the interpreter) ---------------

KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(y_ptr + off, tl.load(x_ptr + off, mask=m) * 2.0, mask=m)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2),
                          triton.Config({"BLOCK": 128}, num_warps=4)], key=["n"])
@triton.jit
def tuned_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(y_ptr + off, tl.load(x_ptr + off, mask=m) + 1.0, mask=m)
'''

DRIVER = '''
import json, sys
import torch
from triton import knobs
from triton.runtime import autotuner
from cpo_fast.bench import aot
import kern

x = torch.empty(1024, device="meta")
y = torch.empty(1024, device="meta")
hook, run = knobs.runtime.jit_cache_hook, autotuner.Autotuner.run
with aot.capture(80) as found:
    kern.double_kernel[(4,)](x, y, 1000, BLOCK=256, num_warps=4)
    kern.tuned_kernel[(8,)](x, y, 1024)
restored = knobs.runtime.jit_cache_hook is hook and autotuner.Autotuner.run is run
rows = [dict(name=f.name, signature=f.signature, consts=f.constants(), options=f.options,
             n_divisible=any(a == ["tt.divisibility", 16] for a in f.attrs.get((2,), [])))
        for f in found]
builds = {cc: aot.build(found[0], cc) for cc in (80, 90)}
print(json.dumps(dict(rows=rows, builds=builds, restored=restored)))
'''


def test_capture_and_build_a_tiny_kernel(tmp_path):
    why = gpu_toolchain_missing()
    if why:
        pytest.skip(why)
    (tmp_path / "kern.py").write_text(KERNEL)
    (tmp_path / "drive.py").write_text(DRIVER)
    env = compiler_env()
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(tmp_path / "drive.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["restored"] is True  # the hook and the autotuner are put back
    rows = out["rows"]
    # one launch for the plain kernel, one per autotune config, nothing compiled or run
    assert [r["name"] for r in rows] == ["double_kernel", "tuned_kernel", "tuned_kernel"]
    assert rows[0]["signature"] == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32",
                                    "BLOCK": "constexpr"}
    assert rows[0]["consts"] == {"BLOCK": 256}
    assert rows[0]["options"]["num_warps"] == 4
    assert [r["consts"]["BLOCK"] for r in rows[1:]] == [64, 128]
    assert [r["options"]["num_warps"] for r in rows[1:]] == [2, 4]
    # specialization from the actual arguments: n=1000 is not a multiple of 16, 1024 is
    assert [r["n_divisible"] for r in rows] == [False, True, True]
    for cc, b in out["builds"].items():
        assert b["regs"] > 0 and b["spill_store"] == 0 and b["spill_load"] == 0, (cc, b)
        assert b["warps"] == 4 and b["stages"] == rows[0]["options"]["num_stages"]
        assert b["mma"] == b["wgmma"] == b["tcgen05"] == 0  # no dot in this kernel
        occ = aot.occupancy(b["regs"], b["smem"], b["warps"], int(cc))
        assert (b["ctas_per_sm"], b["warps_per_sm"]) == (occ["ctas_per_sm"], occ["warps_per_sm"])
