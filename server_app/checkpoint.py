"""ServerApp checkpoints: written atomically after every round and stage, read by `resume=<dir>`.

One file, `<output_dir>/checkpoint/checkpoint.npz`, replaced by a single rename (see
`nmoe.atomic.write_atomic`), so a run killed at any point leaves either the previous checkpoint or
the new one, never a mix. It is an uncompressed npz (no pickles) with:

- `manifest`: uint8 bytes of a UTF-8 JSON object `{"format": "nmoe-checkpoint", "version": 2,
  "state": {...}, "arrays": [...]}`. `state` holds the progress (completed stages, the stage and
  round in progress), the results so far and the byte ledger; `arrays` lists every server-side
  array as `{"record", "key", "entry", "dtype", "shape", "sha256"}`.
- `a0`, `a1`, ...: the arrays (stage-1 extractor, FedAvg baseline, shared gate/expert parts),
  each checked against its manifest line on load.

Runs of earlier versions wrote two files, `arrays.npz` then `state.json`; `load` still reads them
and refuses, with a clear error, the mix a crash between those two writes could leave.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from nmoe.atomic import clean_temp_files, fsync_dir, write_atomic

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.npz"
MANIFEST_ENTRY = "manifest"
FORMAT = "nmoe-checkpoint"
VERSION = 2
# the two-file layout of version 1
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
SEP = "::"
PARTIAL_SUFFIX = (
    ":partial"  # rounds.py keeps the arrays of the round in progress as `<stage>:partial`
)


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupted, inconsistent, unknown format)."""


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


# what reading a damaged checkpoint can raise (files cut short, wrong types, bad zip/npz)
UNREADABLE = (
    OSError,
    EOFError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
)


def save(output_dir: Path, checkpoint: Checkpoint) -> None:
    """Replace `<output_dir>/checkpoint/checkpoint.npz` by one rename.

    The run that owns `output_dir` is its only writer, so every leftover temp file of a killed
    earlier save is removed first, and the version-1 files after the rename. Raises `TypeError`
    or `ValueError` (state not JSON-serialisable, object arrays) before anything is written.
    """
    state = {
        "completed": checkpoint.completed,
        "in_progress": checkpoint.in_progress,
        "results": checkpoint.results,
        "ledger": checkpoint.ledger,
    }
    entries: dict[str, np.ndarray] = {}
    listing = []
    for name, record in checkpoint.arrays.items():
        for key, array in record.items():
            value = np.asarray(array.numpy(), order="C")  # keeps 0-d arrays 0-d
            if value.dtype.hasobject:
                raise ValueError(f"checkpoint array '{name}{SEP}{key}' has dtype object")
            entry = f"a{len(entries)}"
            entries[entry] = value
            listing.append(
                {
                    "record": name,
                    "key": key,
                    "entry": entry,
                    "dtype": value.dtype.str,
                    "shape": list(value.shape),
                    "sha256": _digest(value),
                }
            )
    manifest = json.dumps(
        {"format": FORMAT, "version": VERSION, "state": state, "arrays": listing}
    ).encode()
    entries[MANIFEST_ENTRY] = np.frombuffer(manifest, dtype=np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, allow_pickle=False, **entries)

    folder = Path(output_dir) / CHECKPOINT_DIR
    for name in (CHECKPOINT_FILE, STATE_FILE, ARRAYS_FILE):
        clean_temp_files(folder, target=name, all_files=True)
    write_atomic(folder / CHECKPOINT_FILE, write)
    legacy = [folder / STATE_FILE, folder / ARRAYS_FILE]
    if any(path.exists() for path in legacy):
        for path in legacy:
            path.unlink(missing_ok=True)
        fsync_dir(folder)


def load(resume_dir: str | Path) -> Checkpoint:
    """Read the checkpoint of `resume_dir` (either layout).

    Raises `FileNotFoundError` if there is none and `CheckpointError` if it is unusable.
    Temp files that a killed save left (older than `nmoe.atomic.STALE_TEMP_AGE_S`) are removed.
    """
    folder = Path(resume_dir).expanduser() / CHECKPOINT_DIR
    for name in (CHECKPOINT_FILE, STATE_FILE, ARRAYS_FILE):
        try:
            clean_temp_files(folder, target=name)
        except OSError:  # a read-only copy of a run: reading it is still fine
            pass
    if (folder / CHECKPOINT_FILE).is_file():
        return _load_v2(folder / CHECKPOINT_FILE)
    if (folder / STATE_FILE).is_file():
        return _load_v1(folder)
    raise FileNotFoundError(f"config key 'resume': no checkpoint at {folder / CHECKPOINT_FILE}")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(array, order="C").reshape(-1).view(np.uint8)).hexdigest()


def _load_v2(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if MANIFEST_ENTRY not in npz.files:
                raise CheckpointError(f"checkpoint {path} has no '{MANIFEST_ENTRY}' entry")
            manifest = json.loads(npz[MANIFEST_ENTRY].tobytes().decode())
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format {manifest.get('format')!r} version "
                    f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
                )
            arrays: dict[str, ArrayRecord] = {}
            for line in manifest["arrays"]:
                label = f"'{line['record']}{SEP}{line['key']}'"
                if line["entry"] not in npz.files:
                    raise CheckpointError(f"checkpoint {path} lacks array {label}")
                value = np.array(npz[line["entry"]])
                if (
                    value.dtype.str != line["dtype"]
                    or list(value.shape) != line["shape"]
                    or _digest(value) != line["sha256"]
                ):
                    raise CheckpointError(
                        f"checkpoint {path}: array {label} does not match its manifest"
                    )
                arrays.setdefault(line["record"], ArrayRecord())[line["key"]] = Array(value)
            state = manifest["state"]
    except CheckpointError:
        raise
    except UNREADABLE as error:
        raise CheckpointError(f"checkpoint {path} is unreadable: {error!r}") from error
    return Checkpoint(
        state["completed"], state["in_progress"], state["results"], state["ledger"], arrays
    )


def _load_v1(folder: Path) -> Checkpoint:
    """The two-file layout: `arrays.npz` (keys `<record>::<key>`) written before `state.json`."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        arrays: dict[str, ArrayRecord] = {}
        if (folder / ARRAYS_FILE).is_file():
            with np.load(folder / ARRAYS_FILE, allow_pickle=False) as npz:
                for full_key in npz.files:
                    name, key = full_key.split(SEP, 1)
                    arrays.setdefault(name, ArrayRecord())[key] = Array(np.array(npz[full_key]))
        checkpoint = Checkpoint(
            state["completed"], state["in_progress"], state["results"], state["ledger"], arrays
        )
    except UNREADABLE as error:
        raise CheckpointError(
            f"checkpoint {folder} (two-file layout) is unreadable: {error!r}"
        ) from error
    stage = checkpoint.in_progress.get("stage")
    if stage and checkpoint.round_done(stage) and f"{stage}{PARTIAL_SUFFIX}" not in arrays:
        raise CheckpointError(
            f"checkpoint {folder} (two-file layout of an earlier version) is inconsistent: "
            f"{STATE_FILE} names round {checkpoint.round_done(stage)} of stage '{stage}' but "
            f"{ARRAYS_FILE} has no '{stage}{PARTIAL_SUFFIX}' (the run was killed between the two "
            "writes); restart the run without resume"
        )
    return checkpoint
