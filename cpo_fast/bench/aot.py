"""Ahead-of-time GPU builds of Triton kernels on a machine without a GPU (or a driver).

``capture(fn)`` runs ``fn`` (a real launcher, called on meta tensors) under a stub driver
whose target is a CUDA GPU and a ``jit_cache_hook`` that records every ``kernel[grid](...)``
launch instead of compiling and launching it: the kernel's signature, specialization
(alignment / divisibility attributes, as Triton derives them from the actual arguments),
constexprs and launch options (num_warps, num_stages). Autotuned kernels record one
launch per config. ``build(launch, cc)`` then compiles the recorded launch with
``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` and reads its resources with the
wheel's ``ptxas -v``. Nothing here knows any kernel's signature: it comes from the call.

Must run with TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# Hardware limits used by the occupancy model (CUDA programming guide, compute capability
# table): registers per SM, max warps per SM, max CTAs per SM, shared memory per SM and the
# largest opt-in shared memory per block, and the 1 KB the runtime reserves per CTA.
ARCH = {
    80: dict(name="sm_80", regs=65536, warps=64, ctas=32, smem_sm=167936, smem_block=166912),
    90: dict(name="sm_90a", regs=65536, warps=64, ctas=32, smem_sm=233472, smem_block=232448),
    100: dict(name="sm_100a", regs=65536, warps=64, ctas=32, smem_sm=233472, smem_block=232448),
}
_CTA_RESERVED_SMEM = 1024


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](...)`` call, enough to rebuild it for any target."""

    kernel: Any  # the JITFunction
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages, num_ctas, maxnreg where given
    tag: str = ""  # who launched it (filled in by the caller)

    def key(self) -> tuple:
        const = tuple(sorted((str(k), repr(v)) for k, v in self.constexprs.items()))
        attrs = tuple(sorted((str(k), repr(v)) for k, v in self.attrs.items()))
        return (self.name, tuple(self.signature.items()), const, attrs,
                tuple(sorted(self.options.items())))

    def constants(self) -> dict:
        """Constexpr values by parameter name (for reports and checks)."""
        names = self.kernel.arg_names
        out = {}
        for path, val in self.constexprs.items():
            idx = path[0] if isinstance(path, tuple) else path
            name = names[idx] if isinstance(idx, int) else str(idx)
            out[name] = getattr(val, "value", val)
        return out


class _StubDriver:
    """Stands in for the CUDA driver: a device, a stream and a GPU target, nothing else."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


@contextlib.contextmanager
def capture(cc: int = 90) -> Iterator[list[Launch]]:
    """Record Triton launches made inside the block (see the module docstring)."""
    import triton
    from triton import knobs
    from triton.runtime import autotuner
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT capture needs the real compiler: unset TRITON_INTERPRET.")
    found: list[Launch] = []

    def hook(*, fn, compile, **_kw) -> bool:
        opts = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas")}
        found.append(Launch(fn.jit_function, fn.name, dict(compile["signature"]),
                            dict(compile["constants"]), dict(compile["configs"][0]), opts))
        return True  # handled: no compile, no launch

    def autotune_run(self, *args, **kwargs):  # every config, no benchmarking
        for cfg in self.configs:
            kw = {**kwargs, **cfg.all_kwargs()}
            if cfg.pre_hook is not None:
                with contextlib.suppress(Exception):
                    cfg.pre_hook({**dict(zip(self.arg_names, args, strict=False)), **kw})
            self.fn.run(*args, **kw)

    old_hook, old_run = knobs.runtime.jit_cache_hook, autotuner.Autotuner.run
    driver.set_active(_StubDriver(cc))
    knobs.runtime.jit_cache_hook = hook
    autotuner.Autotuner.run = autotune_run
    try:
        yield found
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        autotuner.Autotuner.run = old_run
        with contextlib.suppress(Exception):
            driver.reset_active()
    del triton


def _ptxas(cc: int) -> str:
    from triton.backends.nvidia import compiler as nv

    get = getattr(nv, "get_ptxas", None)
    if get is not None:
        try:
            return get(cc).path
        except TypeError:  # older Triton: get_ptxas() without an arch
            return get().path
    return nv.knobs.nvidia.ptxas.path


def ptxas_path(cc: int = 80) -> str | None:
    try:
        path = _ptxas(cc)
    except Exception:
        return None
    return path if path and os.path.exists(path) else None


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(ptx: str, cc: int) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` on this PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(cc), "-v", f"--gpu-name={ARCH[cc]['name']}", src,
                              "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = _RE_REGS.search(log)
    spill = _RE_SPILL.search(log)
    stack = _RE_STACK.search(log)
    return dict(regs=int(regs.group(1)) if regs else 0,
                spill_store=int(spill.group(1)) if spill else 0,
                spill_load=int(spill.group(2)) if spill else 0,
                stack=int(stack.group(1)) if stack else 0)


def ptx_features(ptx: str) -> dict:
    """Static speed proxies: tensor-core and asynchronous-copy instructions in the PTX."""
    count = lambda op: len(re.findall(r"^\s*(?:@!?%p\d+\s+)?" + op, ptx, re.M))  # maybe predicated
    return dict(mma=count(r"mma\.sync"), wgmma=count(r"wgmma\.mma_async"),
                tcgen05=count(r"tcgen05\.mma"), cp_async=count(r"cp\.async\.c[ag]"),
                tma=count(r"cp\.async\.bulk"))


def occupancy(regs: int, smem: int, warps: int, cc: int) -> dict:
    """Resident CTAs and warps per SM from registers and shared memory (a model)."""
    a = ARCH[cc]
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation unit: 256 registers / warp
    by_regs = (a["regs"] // regs_warp) // warps
    by_smem = a["smem_sm"] // (smem + _CTA_RESERVED_SMEM)
    ctas = min(by_regs, by_smem, a["warps"] // warps, a["ctas"])
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps)


def build(launch: Launch, cc: int) -> dict:
    """Compile one recorded launch for sm_<cc> and measure it (statically)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.kernel, signature=launch.signature,
                    constexprs=launch.constexprs, attrs=launch.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(launch.options))
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    smem = int(getattr(md, "shared", 0) or 0)
    res = ptxas_report(ptx, cc)
    res.update(ptx_features(ptx))
    res.update(smem=smem, warps=launch.options["num_warps"], stages=launch.options["num_stages"])
    res.update(occupancy(res["regs"], smem, res["warps"], cc))
    return res


def run_quietly(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """fn() -> (result, None), or (None, 'ExcType: message') on failure."""
    try:
        return fn(), None
    except Exception as exc:  # a compile error is a result here, not a crash
        msg = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {msg[-1] if msg else ''}"[:300]
