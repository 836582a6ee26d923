"""Tests of cpo_fast/bench (the `cpo-fast bench` command and the benchmark library)."""
