"""Benchmarks: the ``cpo-fast bench`` command and the harness the scripts in benchmarks/ import.

One concern per module (docs/benchmarks.md):

    arguments   the command's flags and help text (all the CLI imports to build its parser)
    command     ``cpo-fast bench``: runs the cases and prints the record
    cases       op-level and end-to-end cases, each run in a fresh process
    e2e         the end-to-end paths: tiny model, batch, per-path log-probs, training step
    isolation   the fork server: one fresh process per case
    report      the command's human-readable tables
    environment the environment record (device, versions, load, commit) of every result
    measure     timing and peak-memory helpers
    harness     floors and results files of the scripts in benchmarks/
    aot         ahead-of-time GPU builds of the Triton kernels (the compile gate)
    sweep       confounding sweeps behind benchmarks/reproduce*.py
    emobank     the EmoBank corpus and the VADER scorer of those sweeps
"""
