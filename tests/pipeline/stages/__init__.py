"""Tests of cpo_fast/pipeline/stages."""
