"""Safe persistence: what a run writes can survive a crash, and what it reads cannot run code.

- Every file is written whole or not at all: to a temporary name in the same directory,
  fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX), then the
  directory is fsync'ed so the rename itself is durable. A crash (kill -9, power loss)
  leaves either the old file or the new one, never a torn one.
- Tensors go to safetensors, everything else to JSON. Nothing is ever unpickled: a file in
  a pickle format (``torch.save``'s ``.pt``/``.bin``) is refused with an error that names it.
- Write failures (a full disk, a read-only directory) raise :class:`WriteError`, an
  ``OSError`` whose message names the file and the cause; the temporary file is removed
  and the previous version of the target stays in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class WriteError(OSError):
    """A file could not be written; ``str()`` names the path and what to do."""


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(e: OSError, path: Path) -> str:
    why = e.strerror or str(e)
    hint = {28: "free some disk space", 13: "make it writable or choose another --output-dir",
            30: "choose a writable --output-dir"}.get(e.errno or 0, "check the path")
    return f"cannot write {path}: {why}; {hint}. The previous version (if any) is unchanged."


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise WriteError(e.errno, _describe(e, path)) from e
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run outputs are ordinary data
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(e.errno, _describe(e, path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    return float(x)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it or restore it.") from None


def update_json(path: str | Path, new: dict) -> dict:
    """Extend a JSON object file (results.json): ``new``'s fields replace theirs, every other
    field (an earlier evaluation, say) is kept; the file is rewritten whole, atomically."""
    path = Path(path)
    merged = {**(read_json(path) if path.is_file() else {}), **new}
    write_json(path, merged)
    return merged


def as_oserror(e: Exception) -> OSError:
    """safetensors reports I/O failures (a full disk) as ``SafetensorError`` whose text holds
    the OS error code (``Os { code: 28, ...``): the same failure as an ``OSError``."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"code: (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    flat = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}

    def write(p: Path) -> None:
        try:
            save_file(flat, str(p))
        except SafetensorError as e:
            raise as_oserror(e) from e

    return atomic_write(path, write)


def refuse_pickle(path: str | Path) -> None:
    """Raise if ``path`` is (or a directory holds) a file in a pickle format."""
    path = Path(path)
    found = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    bad = [p for p in found if p.suffix in PICKLE_SUFFIXES or _is_pickle(p)]
    if bad:
        raise ValueError(f"{bad[0]}: a pickle file; cpo_fast never unpickles (loading it could "
                         "run code from whoever wrote it). Use a checkpoint written by this "
                         "version (safetensors + JSON) or delete the directory.")


def _is_pickle(path: Path) -> bool:
    """Pickle protocol 2+ starts with 0x80; torch.save zips start with 'PK' and hold data.pkl."""
    if not path.is_file() or path.suffix in (".json", ".jsonl", ".safetensors", ".txt"):
        return False
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or (head == b"PK" and path.suffix != ".npz")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (no pickle involved); clear errors for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    refuse_pickle(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}).") from None
