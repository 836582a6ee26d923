"""Tests of cpo_fast/pipeline/report."""
