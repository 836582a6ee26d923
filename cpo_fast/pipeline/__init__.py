"""The paper's workflow on Hugging Face models, behind the ``cpo-fast`` CLI: load direct
outcome data, fit f_0, cache its token log-probabilities, fit the cross-fitted outcome model,
build the direct-method set, train the policy, generate and evaluate. docs/pipeline.md walks
through the modules in order."""
