"""Constants shared by the ops, the objectives and the pipeline."""

IGNORE_INDEX = -100
