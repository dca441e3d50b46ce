"""Atomic file writes: write beside the target, fsync, rename. A killed process never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """OSError with a plain message (the CLI prints it) unless PATH (a file, or a folder with `folder=True`) can be
    created or replaced: no ancestor is a regular file and PATH itself is not the wrong kind. Commands call it
    before any work."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        error = IsADirectoryError if path.is_dir() else NotADirectoryError
        raise error(f"cannot write {path}: it is {'a folder' if path.is_dir() else 'a file'}; "
                    f"give a {'folder' if folder else 'file'} path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder; choose another path")
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The permissions open() gives a new file; read once at import, before any thread writes files.
NEW_FILE_MODE = 0o666 & ~_umask()


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file beside PATH, with PATH's permissions where it exists, else those of a new file:
    mkstemp's 0600 would make every output unreadable to the user's group (a shared cluster folder, a server)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.exists() else NEW_FILE_MODE)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on clean exit it replaces `path`, on error it is removed."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def finite_json(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON null), through dicts, lists and tuples."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def dumps_json(data: Any, indent: int | None = None) -> str:
    """Strict JSON text (no NaN/Infinity literals, which strict parsers reject): non-finite floats become null."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, dumps_json(data, indent=2) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
