"""Train a small tokenizer on the data itself (no download).

``kind="bpe"`` (default): byte-level BPE, so any text round-trips through decode (the
oracle and the outcome model can score generations exactly as written).
``kind="wordlevel"``: one token per lower-cased word or punctuation mark (unknown words
map to ``<unk>``; decode joins tokens with spaces). Either way the result is a
``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``
(ids 0, 1, 2, 3), right padding, and a post-processor that prepends ``<bos>`` when
``add_special_tokens=True`` (as Llama's does); :func:`cpo_fast.pipeline.data.encode`
adds BOS/EOS itself. Save it with ``save_pretrained(dir)``.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    *,
    min_frequency: int = 2,
    kind: str = "bpe",
    model_max_length: int = 128,
):
    """Train a tokenizer on ``texts`` and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: texts is empty.")
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS)
    else:
        raise ValueError(f"kind must be 'bpe' or 'wordlevel', got {kind!r}.")
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right", model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
