"""Run state: settings, paths, processes, persistence, checkpoints, signals, preflight checks."""
