"""Tests of cpo_fast/integrations."""
