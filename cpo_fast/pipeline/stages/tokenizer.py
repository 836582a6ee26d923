"""Train a small tokenizer on the data itself (no download).

``kind="bpe"`` (default): byte-level BPE, so any text round-trips through decode (the
oracle and the outcome model can score generations exactly as written).
``kind="wordlevel"``: one token per lower-cased word or punctuation mark (unknown words
map to ``<unk>``; decode joins tokens with spaces). Either way the result is a
``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``
(ids 0, 1, 2, 3), right padding, and a post-processor that prepends ``<bos>`` when
``add_special_tokens=True`` (as Llama's does); :func:`cpo_fast.pipeline.stages.data.encode`
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
        # show_progress=False: the trainer's bar prints blank lines when not on a terminal
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS, show_progress=False)
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


# Pretraining document separators, in the order they are looked for: GPT-2, SmolLM2, Qwen2,
# Pythia, ... write "<|endoftext|>" between documents; Llama 3 "<|begin_of_text|>".
DOCUMENT_TOKENS = ("<|endoftext|>", "<|begin_of_text|>", "</s>")


def _adds_bos(tokenizer) -> bool:
    """Does the tokenizer itself prepend its BOS token (so the model saw it at every
    document start in pretraining, as Llama's and Gemma's do)?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def document_start(tokenizer) -> str:
    """The token that starts a document for this tokenizer's model: its BOS when the
    tokenizer prepends it itself, else the pretraining separator (``<|endoftext|>``, ...),
    else EOS. A BOS that the tokenizer never prepends is a chat marker (SmolLM2-Instruct's
    BOS is ``<|im_start|>``): unconditioned text must not start from it."""
    if _adds_bos(tokenizer):
        return tokenizer.bos_token
    vocab = tokenizer.get_vocab()
    for t in DOCUMENT_TOKENS:
        if t in vocab:
            return t
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    if tokenizer.bos_token is not None:
        return tokenizer.bos_token
    raise ValueError("the tokenizer has no BOS, EOS or <|endoftext|> token: nothing marks a "
                     "document start; set bos_token in its tokenizer_config.json.")


def for_documents(tokenizer):
    """Point the tokenizer's BOS and EOS at document boundaries (in place; returned).

    The pipeline writes every text as ``BOS + text + EOS`` and samples unconditioned text
    from ``[BOS]``, so BOS must be what precedes a document in the model's pretraining, and
    EOS what ends one. For a tokenizer that prepends its own BOS nothing changes. Otherwise
    (SmolLM2, GPT-2, Qwen2) both become the separator (``<|endoftext|>``), as in
    pretraining, and a chat-turn EOS (``<|im_end|>``) is not used. Chat templates are never
    applied here. Returns the tokenizer."""
    start = document_start(tokenizer)
    if start != tokenizer.bos_token:
        tokenizer.bos_token = start
        if start in DOCUMENT_TOKENS[:1] or tokenizer.eos_token is None:
            tokenizer.eos_token = start
    if tokenizer.pad_token_id is None:  # HF models often ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
