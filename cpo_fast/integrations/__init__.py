"""Integrations with other training libraries (imported on demand; each needs its extra).

``cpo_fast.integrations.trl``: make TRL (>= 1.16) compute its per-token log-probs and
entropies with cpo_fast (``pip install 'cpo_fast[trl]'``).
"""
