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
    """Accumulates everything results.json holds, in the contract's shape (see the README)."""

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
        """A method's accuracy per client on the local test splits and the global test set."""
        self.data["accuracy"][method] = method_entry(local)
        self.data["accuracy_global"][method] = method_entry(global_)

    def log_round(self, **row: Any) -> None:
        """One row of the per-round history (stage, round, metrics)."""
        self.data["history"].append(row)

    def record_stage(
        self, stage: str, seconds: float, comm_bytes: dict[str, dict[str, int]]
    ) -> None:
        """A stage's wall time, and the byte ledger so far."""
        self.data["wall_time_s"][stage] = round(seconds, 3)
        self.data["comm_bytes"] = comm_bytes

    def record_dropped(self, stage: str, clients: list[int], rnd: int | None = None) -> None:
        """Clients that failed or timed out in a stage (and round)."""
        entry: dict[str, Any] = {"stage": stage, "clients": clients}
        if rnd is not None:
            entry["round"] = rnd
        self.data["extra"].setdefault("dropped", []).append(entry)

    def set_extra(self, key: str, value: Any) -> None:
        self.data["extra"][key] = value

    def append_extra(self, key: str, value: Any) -> None:
        self.data["extra"].setdefault(key, []).append(value)

    def set_extra_item(self, key: str, item: str, value: Any) -> None:
        """`extra[key][item] = value`."""
        self.data["extra"].setdefault(key, {})[item] = value

    def set(self, key: str, value: Any) -> None:
        """A top-level entry (`topology`, `nodes`, `routing_counts`, ...)."""
        self.data[key] = value

    def set_item(self, key: str, item: str, value: Any) -> None:
        """`results[key][item] = value` (`inference_latency`, `predictions`, ...)."""
        self.data.setdefault(key, {})[item] = value

    def restore(self, saved: dict[str, Any]) -> None:
        """Everything a checkpoint kept, except the config and the node directory."""
        self.data.update({k: v for k, v in saved.items() if k not in ("config", "nodes")})

    def mark_completed(self) -> None:
        self.data["status"] = "completed"

    def mark_failed(self, error: BaseException) -> None:
        self.data["status"] = "failed"
        self.data["error"] = f"{type(error).__name__}: {error}"

    def write(self, output_dir: str | Path) -> Path:
        return write_json_atomic(Path(output_dir) / "results.json", self.data)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json."""
    with Path(path).open() as handle:
        return json.load(handle)
