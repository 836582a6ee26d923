"""The shared stages before training: data, tokenizer, models, f_0, reference cache, ghat, DM set."""
