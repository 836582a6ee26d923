"""Tests of cpo_fast/pipeline/run."""
