"""Tests of cpo_fast/ops: one module per op, every backend against the float64 reference."""
