"""The human-readable tables of a ``cpo-fast bench`` record (``--json`` prints the record)."""

from __future__ import annotations

from cpo_fast.bench.measure import MiB


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
             f"(torch {env['torch']}, trl {env.get('trl')}; load {env['loadavg_before'][0]:.2f})",
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

