"""Training a policy: the rows of each step, the loop, its guard and its metrics."""
