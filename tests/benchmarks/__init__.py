"""Tests of the scripts in benchmarks/: each runs at its smallest setting (numbers unchecked)."""
