"""Atomic file writes: readers see the old file or the new one, never half of one.

A write fills a temp file `.<name>.<8 random chars>.tmp` beside the target, fsyncs it, renames it
over the target and fsyncs the folder, so the rename itself survives a power cut. A writer killed
before its rename leaves the temp file behind: the next `write_atomic` of the same target removes
the ones older than `STALE_TEMP_AGE_S`, and `clean_temp_files` sweeps a whole folder (at start-up,
when the caller knows no writer is active, it may remove them all).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
# `.<target name>.<random>.tmp`: the random part is tempfile.mkstemp's (8 of [a-z0-9_])
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
# a live writer touches its temp file at least this often (creation, writes, fsync, rename)
STALE_TEMP_AGE_S = 30.0


def temp_target(name: str) -> str | None:
    """The target file name a temp file of this module stands for, or None if `name` is not one."""
    match = TEMP_NAME.match(name)
    return match.group("target") if match else None


def clean_temp_files(
    folder: str | Path,
    *,
    target: str | None = None,
    min_age_s: float = STALE_TEMP_AGE_S,
    all_files: bool = False,
) -> list[Path]:
    """Remove this module's leftover temp files in `folder` (not recursive); return those removed.

    Only regular files named like this module's temp files are touched (never symlinks, folders
    or other names), only those of `target` if given, and only those not modified for `min_age_s`
    seconds unless `all_files` (the caller knows no writer is active). A missing folder is fine.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    now = time.time()
    removed = []
    for entry in entries:
        name_target = temp_target(entry.name)
        if name_target is None or (target is not None and name_target != target):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            if not all_files and now - info.st_mtime < min_age_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # another cleaner or its writer's rename got there first
            continue
        removed.append(Path(entry.path))
    if removed:
        fsync_dir(folder)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename, a new or removed file) to disk where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open a folder; its renames need no folder fsync
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _make_parents(folder: Path) -> None:
    """Create `folder` and its missing parents, each new entry flushed in its own parent."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Let `write(tmp_path)` fill a temp file beside `path`, fsync it, then rename it over `path`:
    readers see the old file or the new one, never half of one.

    Temp files of earlier writers of `path` that died before their rename (older than
    `STALE_TEMP_AGE_S`) are removed first. The folder is fsynced after the rename. Whatever
    `write` raises is raised after its temp file is removed; `path` is then unchanged.
    """
    path = Path(path)
    _make_parents(path.parent)
    clean_temp_files(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
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
