"""After training: generation, evaluation, off-policy estimates, plots, the demo."""
