"""Tests of cpo_fast/pipeline/training."""
