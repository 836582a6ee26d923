"""Tests of cpo_fast/pipeline, laid out like it: run/, stages/, training/, report/."""
