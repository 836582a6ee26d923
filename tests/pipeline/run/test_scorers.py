"""Scorers named on the command line (cpo_fast/pipeline/run/scorers.py): loaded from
'module:function', and their outputs checked to be one finite number per text; each error
names the scorer and what a scorer must do."""

from __future__ import annotations

import numpy as np
import pytest

from cpo_fast.pipeline.run.scorers import load_scorer, run_scorer
from cpo_fast.pipeline.stages.synthetic import oracle


def test_load_scorer():
    name, fn = load_scorer("cpo_fast.pipeline.stages.synthetic:oracle")
    assert name == "oracle" and fn is oracle
    for spec, says in [("oracle", "expected 'module:function'"), (":f", "expected"),
                       ("no_such_module:f", "cannot load it"),
                       ("cpo_fast.pipeline.stages.synthetic:nope", "cannot load it"),
                       ("math:pi", "is not callable")]:
        with pytest.raises(ValueError, match=f"--scorer '{spec}'.*{says}"):
            load_scorer(spec)


def test_run_scorer():
    texts = ["a", "bb", "ccc"]
    assert run_scorer("len", lambda t: [len(x) for x in t], texts).tolist() == [1.0, 2.0, 3.0]
    assert run_scorer("col", lambda t: np.ones((len(t), 1)), texts).shape == (3,)
    for fn, says in [(lambda t: "3", "TypeError: returned a str; a scorer takes a list of texts"),
                     (lambda t: 1 / 0, "ZeroDivisionError"),
                     (lambda t: [1.0], "returned 1 numbers for 3 texts"),
                     (lambda t: [1.0, float("nan"), 2.0], "returned NaN or infinite scores")]:
        with pytest.raises(ValueError, match=f"--scorer 'mine': {says}"):
            run_scorer("mine", fn, texts)
