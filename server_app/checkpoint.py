"""ServerApp checkpoints: written atomically after every round and stage, read by `resume=<dir>`.

`<output_dir>/checkpoint/state.json` holds the progress (completed stages, the
stage and round in progress), the results so far, the byte ledger and the node
directory; `arrays.npz` holds the server-side parameters (stage-1 extractor,
FedAvg baseline model, shared gate/expert parts). Both are replaced by rename,
so a crash leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from nmoe.atomic import write_json_atomic, write_npz_atomic

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
SEP = "::"


@dataclass
class Checkpoint:
    """What a resumed run needs: progress, results so far, ledger, server-side arrays."""

    completed: list[str] = field(default_factory=list)
    in_progress: dict[str, Any] = field(default_factory=dict)  # {"stage": str, "round": int}
    results: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)

    def round_done(self, stage: str) -> int:
        """Last completed round of `stage` (0 if none)."""
        return (
            int(self.in_progress.get("round", 0)) if self.in_progress.get("stage") == stage else 0
        )


def save(output_dir: Path, checkpoint: Checkpoint) -> None:
    """Write arrays first, then state.json (which names a consistent set of arrays)."""
    folder = output_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{name}{SEP}{key}": arr.numpy()
        for name, rec in checkpoint.arrays.items()
        for key, arr in rec.items()
    }
    write_npz_atomic(folder / ARRAYS_FILE, flat)
    write_json_atomic(
        folder / STATE_FILE,
        {
            "completed": checkpoint.completed,
            "in_progress": checkpoint.in_progress,
            "results": checkpoint.results,
            "ledger": checkpoint.ledger,
        },
    )


def load(resume_dir: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save`; a clear error if there is none."""
    folder = Path(resume_dir).expanduser() / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"config key 'resume': no checkpoint at {folder / STATE_FILE}")
    state = json.loads((folder / STATE_FILE).read_text())
    arrays: dict[str, ArrayRecord] = {}
    if (folder / ARRAYS_FILE).is_file():
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as npz:
            for full_key in npz.files:
                name, key = full_key.split(SEP, 1)
                arrays.setdefault(name, ArrayRecord())[key] = Array(np.array(npz[full_key]))
    return Checkpoint(
        state["completed"], state["in_progress"], state["results"], state["ledger"], arrays
    )
