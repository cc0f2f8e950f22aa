"""A client's personal state: in `context.state`, mirrored to a per-node folder on disk.

The run's config arrives once (`query.setup`) and is kept in `context.state` and, with a
`state-dir` in the node config, in `<state-dir>/setup/run-<run id>.json`, so a restarted
SuperNode picks the run up again. What persists (expert, gates, the received extractor, own head)
is written atomically as safetensors under `<state-dir>/<run-key>/partition-<id>.safetensors`;
a restarted SuperNode reads it back. Safetensors holds tensors only (no pickled code).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors.torch import load_file, save_file

from nmoe.atomic import write_atomic

CONFIG_KEY = "nmoe-config"
PERSISTED_PREFIXES = ("model/",)  # scratch entries (caches, pending queries) stay in memory
SEP = "::"
SETUP_DIR = "setup"


class PersonalState:
    """Named groups of arrays (`model/expert`, `scratch/cache` ...) plus the run config."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.state = context.state
        self.partition_id = int(context.node_config.get("partition-id", 0))
        self.num_partitions = int(context.node_config.get("num-partitions", 1))
        state_dir = context.node_config.get("state-dir")
        self.state_dir = Path(str(state_dir)) if state_dir else None
        if CONFIG_KEY not in self.state.config_records:
            saved = self.setup_path()
            if saved is not None and saved.is_file():  # a restarted node: the run's set-up
                self.state[CONFIG_KEY] = ConfigRecord({"json": saved.read_text()})
        has_models = any(name.startswith(PERSISTED_PREFIXES) for name in self.state.array_records)
        path = self.file_path()
        if not has_models and path is not None and path.is_file():
            self.load_file(path)  # a restarted node gets its personal state back

    # --- config -----------------------------------------------------------------
    def setup_path(self) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / SETUP_DIR / f"run-{self.context.run_id}.json"

    def set_config(self, config_json: str) -> None:
        """Keep the run's config (in memory and, with a state-dir, on disk)."""
        self.state[CONFIG_KEY] = ConfigRecord({"json": config_json})
        path = self.setup_path()
        if path is not None:
            write_atomic(path, lambda tmp: Path(tmp).write_text(config_json))
        saved = self.file_path()
        if saved is not None and saved.is_file() and not self.holds():
            self.load_file(saved)

    def has_config(self) -> bool:
        return CONFIG_KEY in self.state.config_records

    def config_json(self) -> str:
        if not self.has_config():
            raise ValueError("this node has no run set-up yet (the server sends query.setup first)")
        return str(self.state[CONFIG_KEY]["json"])

    # --- arrays -----------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.state.array_records

    def holds(self) -> list[str]:
        """The persisted groups this node holds."""
        return sorted(n for n in self.state.array_records if n.startswith(PERSISTED_PREFIXES))

    def get(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.state.array_records:
            raise ValueError(
                f"this node holds no '{name}' yet (run the stage that creates it first)"
            )
        return {k: v.numpy() for k, v in self.state[name].items()}

    def put(self, name: str, arrays: dict[str, Any]) -> None:
        self.state[name] = ArrayRecord(
            {k: Array(np.ascontiguousarray(_to_numpy(v))) for k, v in arrays.items()}
        )

    def drop(self, name: str) -> None:
        if name in self.state.array_records:
            del self.state[name]

    # --- disk ---------------------------------------------------------------------
    def run_key(self) -> str:
        """Folder name that separates runs: the config's `state_key` or the Flower run id."""
        cfg = json.loads(self.config_json())
        return str(cfg.get("state_key") or f"run-{self.context.run_id}")

    def file_path(self) -> Path | None:
        if self.state_dir is None or not self.has_config():
            return None
        return self.state_dir / self.run_key() / f"partition-{self.partition_id}.safetensors"

    def persist(self) -> Path | None:
        """Write every persisted group atomically (temp file, fsync, rename)."""
        path = self.file_path()
        if path is None:
            return None
        tensors = {
            f"{name}{SEP}{key}": torch.from_numpy(np.array(arr.numpy()))
            for name, record in self.state.array_records.items()
            if name.startswith(PERSISTED_PREFIXES)
            for key, arr in record.items()
        }
        write_atomic(
            path, lambda tmp: save_file(tensors, tmp, metadata={"config": self.config_json()})
        )
        return path

    def load_file(self, path: Path) -> None:
        for name, arrays in read_state_file(path).items():
            self.put(name, arrays)


def read_state_file(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """A saved personal state file: group -> {parameter key: array} (safetensors, no pickle)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for full_key, tensor in load_file(str(path)).items():
        name, key = full_key.split(SEP, 1)
        groups.setdefault(name, {})[key] = tensor.numpy()
    return groups


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
