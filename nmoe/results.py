"""The results file (see DESIGN.md, results contract) and atomic JSON writes."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable


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


def method_entry(per_client: dict[int, float]) -> dict[str, Any]:
    """`{"mean", "per_client", "clients"}` for one method: values ordered by client id, and the
    ids they belong to (a client that dropped out has no value)."""
    clients = sorted(per_client)
    values = [float(per_client[c]) for c in clients]
    return {"mean": statistics.fmean(values) if values else float("nan"), "per_client": values, "clients": clients}


class Results:
    """Accumulates everything results.json holds, in the contract's shape."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {
            "config": config,
            "accuracy": {},
            "accuracy_global": {},
            "comm_bytes": {},
            "wall_time_s": {},
            "history": [],
            "extra": {},
        }

    def set_accuracy(self, method: str, local: dict[int, float], global_: dict[int, float]) -> None:
        self.data["accuracy"][method] = method_entry(local)
        self.data["accuracy_global"][method] = method_entry(global_)

    def log_round(self, **row: Any) -> None:
        self.data["history"].append(row)

    def write(self, output_dir: str | Path) -> Path:
        return write_json_atomic(Path(output_dir) / "results.json", self.data)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json."""
    with Path(path).open() as handle:
        return json.load(handle)
