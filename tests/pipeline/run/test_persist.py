"""Safe persistence (cpo_fast/pipeline/run/persist.py): whole-or-nothing writes that keep the
previous file on failure, JSON of numpy / torch values, merged results, no unpickling."""

from __future__ import annotations

import errno
import pickle

import numpy as np
import pytest
import torch

from cpo_fast.pipeline.run.persist import (
    WriteError,
    as_oserror,
    atomic_write,
    load_tensors,
    read_json,
    refuse_pickle,
    save_tensors,
    update_json,
    write_json,
    write_text,
)


def _leftovers(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "results.json", "old")

    def full_disk(p):
        p.write_text("half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*results\.json.*free some disk space"):
        atomic_write(path, full_disk)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []

    def interrupted(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_write_into_a_missing_directory_and_file_mode(tmp_path):
    path = write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert path.read_text() == "x"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_json_of_numpy_and_torch_values_and_a_broken_file(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "c": torch.tensor([1.5, 2.0]),
           "d": torch.tensor(7)}
    path = write_json(tmp_path / "r.json", obj)
    assert read_json(path) == {"a": 0.5, "b": [0, 1, 2], "c": [1.5, 2.0], "d": 7}
    path.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"r\.json: not valid JSON .* delete it or restore it"):
        read_json(path)


def test_update_json_replaces_its_fields_and_keeps_the_others(tmp_path):
    path = tmp_path / "results.json"
    assert update_json(path, {"train": 1}) == {"train": 1}  # a new file
    write_json(path, {"train": 1, "eval": {"judge": 3.2}})
    assert update_json(path, {"train": 2}) == {"train": 2, "eval": {"judge": 3.2}}
    assert read_json(path) == {"train": 2, "eval": {"judge": 3.2}}


def test_pickles_are_refused_by_suffix_or_by_content(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    write_json(ok / "state.json", {"step": 1})
    np.savez(ok / "arrays.npz", x=np.zeros(2))  # a zip, but numpy's: not a pickle
    refuse_pickle(ok)
    refuse_pickle(ok / "state.json")

    (tmp_path / "state.pt").write_bytes(b"anything")
    with pytest.raises(ValueError, match=r"state\.pt: a pickle file; cpo_fast never unpickles"):
        refuse_pickle(tmp_path / "state.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "weights.data").write_bytes(pickle.dumps({"x": 1}))  # protocol >= 2: 0x80
    with pytest.raises(ValueError, match=r"weights\.data: a pickle file"):
        refuse_pickle(bad)
    torch.save({"x": torch.zeros(1)}, bad / "model.safe")  # torch.save's zip: 'PK'
    with pytest.raises(ValueError, match="a pickle file"):
        refuse_pickle(bad / "model.safe")


def test_tensors_round_trip_and_other_files_are_clear_errors(tmp_path):
    t = {"w": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)}
    back = load_tensors(save_tensors(tmp_path / "t.safetensors", t))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    (tmp_path / "junk.safetensors").write_text("not tensors")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_tensors(tmp_path / "junk.safetensors")


def test_safetensors_io_errors_become_oserrors():
    e = as_oserror(RuntimeError("Io error: Os { code: 28, kind: StorageFull }"))
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert as_oserror(RuntimeError("no code")).errno == errno.EIO
    same = OSError(errno.EACCES, "denied")
    assert as_oserror(same) is same
