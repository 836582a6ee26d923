"""Tests of cpo_fast/cpu (the C++ CPU backend) beyond the ops: the shared core, the known-coefficient path."""
