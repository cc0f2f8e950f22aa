"""Atomic file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Let `write(tmp_path)` fill a temp file beside `path`, fsync it, then rename it over `path`:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (see `write_atomic`)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


def write_npz_atomic(path: str | Path, arrays: dict[str, Any]) -> Path:
    """Write numpy arrays as an uncompressed `.npz` atomically (see `write_atomic`)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a name
            np.savez(handle, **arrays)

    return write_atomic(path, write)
