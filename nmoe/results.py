"""The results file (`<output_dir>/results.json`, shape documented in the README)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic


def method_entry(per_client: dict[int, float]) -> dict[str, Any]:
    """`{"mean", "per_client", "clients"}` for one method: values ordered by client id, and the
    ids they belong to (a client that dropped out has no value)."""
    clients = sorted(per_client)
    values = [float(per_client[c]) for c in clients]
    return {
        "mean": statistics.fmean(values) if values else float("nan"),
        "per_client": values,
        "clients": clients,
    }


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
