"""Models a run loads, trains and saves (cpo_fast/pipeline/stages/policy.py): pickled weights
refused, a full disk reported as a write error, a checkpoint of another model size named."""

from __future__ import annotations

import pytest
import torch


def test_pickled_model_weights_are_refused(tmp_path):
    from cpo_fast.pipeline.stages.policy import load_causal_lm

    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_causal_lm(tmp_path, torch.device("cpu"))


def test_save_model_full_disk_is_a_write_error(tmp_path):
    from safetensors import SafetensorError

    from cpo_fast.pipeline.run.persist import WriteError
    from cpo_fast.pipeline.stages.policy import save_model

    class Model:
        def save_pretrained(self, path):
            raise SafetensorError("IoError(Os { code: 28, kind: StorageFull })")

    with pytest.raises(WriteError, match="No space left on device") as e:
        save_model(Model(), None, tmp_path / "m")
    assert e.value.errno == 28


def test_checkpoint_of_another_model_size():
    from cpo_fast.pipeline.stages.policy import load_trainable_state

    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 8\), the model's is \(3, 4\)"):
        load_trainable_state(model, {"weight": torch.zeros(3, 8)})
