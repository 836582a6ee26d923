"""Pipeline on Hugging Face models: data, models, reference log-probs, outcome model,
statistics (this file re-exports those stages), plus training (prepare -> batches -> loss
-> loop, with checkpoint, policy, layout), generation and the demo in their own modules.
docs/pipeline.md walks through them in order."""

from cpo_fast.pipeline.data import DataConfig, Encoded, OutcomeTable, collate, encode, load_table
from cpo_fast.pipeline.estimate import bootstrap_ci, off_policy_estimates
from cpo_fast.pipeline.modeling import (
    build_model,
    last_hidden,
    model_fingerprint,
    output_weight,
    sequence_token_logprobs,
)
from cpo_fast.pipeline.outcome import (
    OutcomeFit,
    bag_of_words_features,
    features_from_callable,
    fit_outcome_model,
    mean_pooled_features,
)
from cpo_fast.pipeline.precompute import (
    data_fingerprint,
    precompute_ref_logprobs,
    sequence_ref_logprob,
)
from cpo_fast.pipeline.synthetic import make_corpus, oracle, write_corpus
from cpo_fast.pipeline.tokenizer import train_tokenizer

__all__ = [
    "DataConfig", "Encoded", "OutcomeFit", "OutcomeTable", "bag_of_words_features",
    "bootstrap_ci", "build_model",
    "collate", "data_fingerprint", "encode", "features_from_callable", "fit_outcome_model",
    "last_hidden", "load_table", "make_corpus", "mean_pooled_features", "model_fingerprint",
    "off_policy_estimates", "oracle", "output_weight", "precompute_ref_logprobs",
    "sequence_ref_logprob", "sequence_token_logprobs", "train_tokenizer", "write_corpus",
]
