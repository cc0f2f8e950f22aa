"""A client's personal state: in `context.state`, mirrored to a per-node folder on disk.

The run's config arrives once (`query.setup`) and is kept in `context.state` and, with a
`state-dir` in the node config, in `<state-dir>/setup/run-<run id>.json`, so a restarted
SuperNode picks the run up again; so are the peers' public keys it pinned for the run
(`<state-dir>/setup/run-<run id>-partition-<id>-peer-keys.json`, see `read_pins`), so a
restarted node keeps refusing a swapped key. What persists (expert, gates, the received
extractor, own head) is written atomically as safetensors under
`<state-dir>/<run-key>/partition-<id>.safetensors`; a restarted SuperNode reads it back.
Safetensors holds tensors only (no pickled code).
"""

from __future__ import annotations

import json
import os
import stat
import time
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import log
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nmoe.atomic import write_atomic
from nmoe.config import STATE_KEY_PATTERN

CONFIG_KEY = "nmoe-config"
OWNER_KEY = "owner"  # state file metadata: the node (partition, federation size) it belongs to
PERSISTED_PREFIXES = ("model/",)  # scratch entries (caches, pending queries) stay in memory
SEP = "::"
SETUP_DIR = "setup"
PINS_FORMAT = "nmoe-peer-keys/1"
PINS_FIELDS = {"format", "run_id", "owner", "keys"}
MAX_PINS_FILE_BYTES = 1 << 20


class PinsFileError(ValueError):
    """A peer-key pins file that fails validation: kept as it is (its owner decides), and this
    node pins nothing else for the run."""


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

    def pins_path(self) -> Path | None:
        """`<state-dir>/setup/run-<run id>-partition-<id>-peer-keys.json` (None without a
        state-dir)."""
        if self.state_dir is None:
            return None
        name = f"run-{self.context.run_id}-partition-{self.partition_id}-peer-keys.json"
        return self.state_dir / SETUP_DIR / name

    def read_pins(self) -> dict[int, bytes]:
        """The peer keys this node pinned for the run, from its pins file ({} if it has none).

        Raises `PinsFileError` for a file that is not a regular JSON file of this format, run
        and owner (`partition-<id>-of-<n>`) with one 32-byte key (hex) per partition id inside
        the federation; the file is left as it is."""
        path = self.pins_path()
        if path is None or not os.path.lexists(path):
            return {}
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise ValueError("not a regular file")
                raw = handle.read(MAX_PINS_FILE_BYTES + 1)
            if len(raw) > MAX_PINS_FILE_BYTES:
                raise ValueError(f"larger than {MAX_PINS_FILE_BYTES} bytes")
            saved = json.loads(raw)
            if not isinstance(saved, dict) or set(saved) != PINS_FIELDS:
                raise ValueError(f"fields {sorted(saved) if isinstance(saved, dict) else saved}")
            if saved["format"] != PINS_FORMAT:
                raise ValueError(f"format {saved['format']!r}, expected {PINS_FORMAT!r}")
            if saved["run_id"] != int(self.context.run_id):
                raise ValueError(f"it belongs to run {saved['run_id']!r}")
            if saved["owner"] != self.owner():
                raise ValueError(f"it belongs to {saved['owner']!r}, not {self.owner()!r}")
            if not isinstance(saved["keys"], dict):
                raise ValueError("'keys' is not an object")
            pins = {}
            for pid, key in saved["keys"].items():
                if not pid.isdigit() or not 0 <= int(pid) < self.num_partitions:
                    raise ValueError(f"a key for partition {pid!r}, outside the federation")
                if not isinstance(key, str) or len(key) != 64:
                    raise ValueError(f"the key of partition {pid} is not 64 hex digits")
                pins[int(pid)] = bytes.fromhex(key)
        except (OSError, ValueError) as err:  # JSONDecodeError and bad hex are ValueErrors
            raise PinsFileError(
                f"peer-key pins {path} refused ({err}): this node pins no other keys for run "
                f"{self.context.run_id} (delete the file to let it pin again)"
            ) from err
        return pins

    def write_pins(self, pins: dict[int, bytes]) -> None:
        """Save the pinned peer keys atomically (nothing without a state-dir)."""
        path = self.pins_path()
        if path is None:
            return
        document = {
            "format": PINS_FORMAT,
            "run_id": int(self.context.run_id),
            "owner": self.owner(),
            "keys": {str(pid): key.hex() for pid, key in sorted(pins.items())},
        }
        text = json.dumps(document, indent=1)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))

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
        """Keep a group; a persisted group with any non-finite value is refused."""
        if name.startswith(PERSISTED_PREFIXES):
            check_finite(name, {k: _to_numpy(v) for k, v in arrays.items()})
        self.state[name] = ArrayRecord(
            {k: Array(np.ascontiguousarray(_to_numpy(v))) for k, v in arrays.items()}
        )

    def drop(self, name: str) -> None:
        if name in self.state.array_records:
            del self.state[name]

    # --- disk ---------------------------------------------------------------------
    def run_key(self) -> str:
        """Folder name that separates runs: the config's `state_key` (one safe name, checked
        again here) or the Flower run id."""
        key = str(json.loads(self.config_json()).get("state_key") or f"run-{self.context.run_id}")
        if not STATE_KEY_PATTERN.match(key):
            raise ValueError(f"state_key {key!r} is not one safe name")
        return key

    def file_path(self) -> Path | None:
        """`<state-dir>/<run key>/partition-<id>.safetensors`, always inside the state-dir."""
        if self.state_dir is None or not self.has_config():
            return None
        root = self.state_dir.resolve()
        path = (root / self.run_key() / f"partition-{self.partition_id}.safetensors").resolve()
        if path.parent.parent != root:
            raise ValueError(f"state file {path} would lie outside the state-dir {root}")
        return path

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
        metadata = {"config": self.config_json(), OWNER_KEY: self.owner()}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    def owner(self) -> str:
        """Which node of which federation a state file belongs to."""
        return f"partition-{self.partition_id}-of-{self.num_partitions}"

    def load_file(self, path: Path) -> None:
        """Read a saved state file back; one that is not this node's, not safetensors, or holds
        anything non-finite is set aside (renamed `*.refused-<time>`) with a log line, and the
        node goes on without it."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                owner = (handle.metadata() or {}).get(OWNER_KEY)
            if owner != self.owner():
                raise ValueError(f"it belongs to {owner!r}, not {self.owner()!r}")
            groups = read_state_file(path)
            for name, arrays in groups.items():
                check_finite(name, arrays)
        except (OSError, ValueError, SafetensorError) as err:
            aside = path.with_name(f"{path.name}.refused-{int(time.time())}")
            path.rename(aside)
            log(WARNING, "state file %s refused (%s); set aside as %s", path, err, aside.name)
            return
        for name, arrays in groups.items():
            self.put(name, arrays)


def read_state_file(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """A saved personal state file: group -> {parameter key: array} (safetensors, no pickle)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for full_key, tensor in load_file(str(path)).items():
        name, key = full_key.split(SEP, 1)
        groups.setdefault(name, {})[key] = tensor.numpy()
    return groups


def check_finite(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Nothing non-finite is ever kept: NaN/Inf in a model group is an error."""
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"non-finite values (NaN/Inf) in '{name}' '{key}': not kept")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
