"""Crash consistency of atomic writes and server checkpoints.

A writer is killed (`os._exit` in a forked child) just before its n-th write point, for every n:
creating the temp file, each write into it, each fsync, the rename, each removal. Afterwards the
target holds the previous version or the new one, and the next write leaves no temp file. A loop
of saves killed by a real SIGKILL at random moments backs this up.
"""

from __future__ import annotations

import builtins
import io
import json
import multiprocessing
import os
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from nmoe import atomic
from nmoe.atomic import clean_temp_files, write_atomic, write_json_atomic
from server_app import checkpoint
from server_app.checkpoint import CHECKPOINT_DIR, Checkpoint, CheckpointError

CRASHED = 86  # exit code of a child killed at its write point
FORK = multiprocessing.get_context("fork")


# --- fault injection ------------------------------------------------------------------------------
class _Counting:
    """File proxy that counts every write (and truncate) as a write point."""

    def __init__(self, handle: Any, point: Callable[[], None]) -> None:
        self._handle = handle
        self._point = point

    def write(self, data: Any) -> int:
        self._point()
        return self._handle.write(data)

    def truncate(self, *args: Any) -> int:
        self._point()
        return self._handle.truncate(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def _instrument(monkeypatch: pytest.MonkeyPatch, crash_at: int) -> list[str]:
    """Count write points; `os._exit(CRASHED)` just before the `crash_at`-th (0 = never)."""
    points: list[str] = []

    def point(label: str) -> None:
        points.append(label)
        if len(points) == crash_at:
            os._exit(CRASHED)

    def wrap(module: Any, name: str) -> None:
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            point(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("fsync", "replace", "rename", "unlink", "truncate"):
        wrap(os, name)
    wrap(tempfile, "mkstemp")
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+"):
            point("open-for-write")
            return _Counting(handle, lambda: point("write"))
        return handle

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return points


def _run_child(action: Callable[[], None], crash_at: int, count_file: Path | None = None) -> int:
    """Run `action` in a forked child that crashes at write point `crash_at`; its exit code."""

    def target() -> None:
        with pytest.MonkeyPatch.context() as monkeypatch:
            points = _instrument(monkeypatch, crash_at)
            action()
        if count_file is not None:
            count_file.write_text(json.dumps(points))
        os._exit(0)

    child = FORK.Process(target=target)
    child.start()
    child.join(60)
    assert child.exitcode is not None, "child hung"
    return child.exitcode


def _count_points(action: Callable[[], None], tmp: Path) -> list[str]:
    count_file = tmp / "points.json"
    assert _run_child(action, 0, count_file) == 0
    points = json.loads(count_file.read_text())
    count_file.unlink()
    return points


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic.temp_target(p.name) is not None)


# --- checkpoints ----------------------------------------------------------------------------------
def _record(seed: int, shapes: dict[str, tuple[int, ...]]) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
    )


def _mid_stage(seed: int = 1) -> Checkpoint:
    """Round 3 of stage 1 done: its arrays are kept as `fe_ce:partial`."""
    return Checkpoint(
        completed=[],
        in_progress={"stage": "fe_ce", "round": 3},
        results={"history": {"fe_ce": [0.1, 0.2, 0.3]}},
        ledger={"fe_ce": {"up": 300, "down": 600}},
        arrays={"fe_ce:partial": _record(seed, {"conv.w": (8, 3, 3), "fc.b": (10,)})},
    )


def _stage_done(seed: int = 2) -> Checkpoint:
    """Stage 1 complete: `fe_ce:partial` gone, `fe_ce` and a baseline stored."""
    return Checkpoint(
        completed=["fe_ce"],
        in_progress={},
        results={"history": {"fe_ce": [0.1, 0.2, 0.3, 0.4]}, "accuracy": {"x": {"mean": 0.9}}},
        ledger={"fe_ce": {"up": 400, "down": 800}},
        arrays={
            "fe_ce": _record(seed, {"conv.w": (8, 3, 3), "fc.b": (10,)}),
            "fedavg": _record(seed + 1, {"w": (4, 4)}),
        },
    )


def _snapshot(ck: Checkpoint) -> tuple[Any, ...]:
    arrays = {
        name: {
            key: (a.numpy().dtype.str, a.numpy().shape, a.numpy().tobytes()) for key, a in r.items()
        }
        for name, r in ck.arrays.items()
    }
    return (ck.completed, ck.in_progress, ck.results, ck.ledger, arrays)


def _assert_usable(ck: Checkpoint) -> None:
    """What a resume reads: the arrays of the round in progress exist."""
    stage = ck.in_progress.get("stage")
    if stage and ck.round_done(stage):
        assert f"{stage}:partial" in ck.arrays


def _save_v1(output_dir: Path, ck: Checkpoint) -> None:
    """The two-file layout of earlier versions (arrays.npz, then state.json)."""
    folder = output_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{n}::{k}": a.numpy() for n, r in ck.arrays.items() for k, a in r.items()}
    with open(folder / "arrays.npz", "wb") as handle:
        np.savez(handle, **flat)
    state = {
        "completed": ck.completed,
        "in_progress": ck.in_progress,
        "results": ck.results,
        "ledger": ck.ledger,
    }
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("previous", ["none", "current", "two-file"])
def test_checkpoint_killed_at_every_write_point_resumes(tmp_path: Path, previous: str) -> None:
    """Kill the save of a completed stage before each of its write points: load gives the
    previous checkpoint (or none) until the rename and the new one from then on, always usable;
    the next save leaves no temp file and no file of the old layout."""
    old, new, later = _mid_stage(), _stage_done(), _mid_stage(seed=7)

    def prepare(out: Path) -> None:
        if previous == "current":
            checkpoint.save(out, old)
        elif previous == "two-file":
            _save_v1(out, old)

    counting_dir = tmp_path / "count"
    prepare(counting_dir)
    points = _count_points(lambda: checkpoint.save(counting_dir, new), tmp_path)
    assert "replace" in points and "fsync" in points and points.count("write") > 5
    outcomes = []
    for n in range(1, len(points) + 1):
        out = tmp_path / f"run-{n}"
        prepare(out)
        assert _run_child(lambda out=out: checkpoint.save(out, new), n) == CRASHED, points[n - 1]
        try:
            loaded = checkpoint.load(out)
        except FileNotFoundError:
            assert previous == "none", f"crash before {points[n - 1]} #{n} lost the checkpoint"
            outcomes.append("old")
        else:
            _assert_usable(loaded)
            got = _snapshot(loaded)
            assert got in (_snapshot(old), _snapshot(new)), f"crash before {points[n - 1]} #{n}"
            outcomes.append("new" if got == _snapshot(new) else "old")
        checkpoint.save(out, later)
        folder = out / CHECKPOINT_DIR
        assert sorted(os.listdir(folder)) == ["checkpoint.npz"], f"after crash #{n}"
        assert _snapshot(checkpoint.load(out)) == _snapshot(later)
    # one switch, at the rename: everything before it reads old, everything after reads new
    switch = outcomes.index("new")
    assert outcomes == ["old"] * switch + ["new"] * (len(points) - switch)
    assert points[switch - 1] == "replace"


def test_sigkill_during_a_loop_of_saves(tmp_path: Path) -> None:
    """A child saving round after round (3 MB each) is SIGKILLed by PID at random moments:
    every resume reads a complete round no older than the last one read; the next save removes
    what the kill left behind."""
    rng = np.random.default_rng(0)
    out = tmp_path / "run"

    def saves(start: int) -> None:
        for rnd in range(start, start + 10_000):
            arrays = {"fe_ce:partial": ArrayRecord({"w": Array(np.full((750, 1000), rnd, "f4"))})}
            ck = Checkpoint([], {"stage": "fe_ce", "round": rnd}, {"r": rnd}, {}, arrays)
            checkpoint.save(out, ck)
        os._exit(0)

    last, leftovers, kills = 0, 0, 12
    for _ in range(kills):
        child = FORK.Process(target=saves, args=(last + 1,))
        child.start()
        deadline = time.monotonic() + 30
        while not (out / CHECKPOINT_DIR / "checkpoint.npz").exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.4)))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        loaded = checkpoint.load(out)
        rnd = loaded.round_done("fe_ce")
        assert rnd >= last and loaded.results == {"r": rnd}
        assert np.all(loaded.arrays["fe_ce:partial"]["w"].numpy() == rnd)
        leftovers += len(_temp_files(out / CHECKPOINT_DIR))
        last = rnd
    checkpoint.save(out, _stage_done())
    assert sorted(os.listdir(out / CHECKPOINT_DIR)) == ["checkpoint.npz"]
    print(f"{kills} SIGKILLs: reached round {last}, {leftovers} temp files left and then removed")


def test_two_file_layout_is_read_and_its_torn_state_refused(tmp_path: Path) -> None:
    """The old layout loads; the mix a kill between its two writes left (new arrays.npz without
    the partial arrays, old state.json naming them) is a clear error, not a KeyError."""
    _save_v1(tmp_path / "ok", _mid_stage())
    assert _snapshot(checkpoint.load(tmp_path / "ok")) == _snapshot(_mid_stage())
    torn = tmp_path / "torn"
    _save_v1(torn, _mid_stage())
    new = _stage_done()
    flat = {f"{n}::{k}": a.numpy() for n, r in new.arrays.items() for k, a in r.items()}
    with open(torn / CHECKPOINT_DIR / "arrays.npz", "wb") as handle:
        np.savez(handle, **flat)
    with pytest.raises(CheckpointError, match=r"round 3 of stage 'fe_ce'.*'fe_ce:partial'"):
        checkpoint.load(torn)


def test_missing_corrupted_and_unsaveable_checkpoints(tmp_path: Path) -> None:
    """No checkpoint, a truncated one or a flipped byte: clear errors. A state that is not JSON
    fails before anything is written."""
    with pytest.raises(FileNotFoundError, match="config key 'resume'"):
        checkpoint.load(tmp_path / "nothing")
    checkpoint.save(tmp_path, _stage_done())
    path = tmp_path / CHECKPOINT_DIR / "checkpoint.npz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path)
    flipped = bytearray(blob)
    flipped[blob.index(b"\x93NUMPY", 100) + 200] ^= 0xFF  # inside an array's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path)
    path.write_bytes(blob)
    bad = _mid_stage()
    bad.results = {"not json": object()}
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, bad)
    assert path.read_bytes() == blob
    assert sorted(os.listdir(tmp_path / CHECKPOINT_DIR)) == ["checkpoint.npz"]


def test_checkpoint_keeps_dtypes_shapes_and_order(tmp_path: Path) -> None:
    arrays = {
        "r": ArrayRecord(
            {
                "scalar": Array(np.array(3.5)),
                "ints": Array(np.arange(6, dtype=np.int64).reshape(2, 3)),
                "strided": Array(np.arange(12.0).reshape(3, 4).T),
                "empty": Array(np.zeros((0, 5), np.float16)),
                "odd/key::name": Array(np.array([True, False])),
            }
        )
    }
    ck = Checkpoint(["a"], {}, {"acc": [0.5]}, {}, arrays)
    checkpoint.save(tmp_path, ck)
    loaded = checkpoint.load(tmp_path)
    assert list(loaded.arrays["r"].keys()) == list(arrays["r"].keys())
    assert _snapshot(loaded) == _snapshot(ck)


# --- client state (safetensors through write_atomic) ----------------------------------------------
def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model/expert::fc.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model/expert::fc.bias": rng.standard_normal(64).astype(np.float32),
    }


def _write_state(path: Path, seed: int, crash_points: bool = False) -> None:
    """The client's call: `write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata))`.

    safetensors writes in Rust, out of reach of the instrumented calls; with `crash_points` the
    writer adds points of its own: before any byte, and with half of the file written."""

    def write(tmp: str) -> None:
        if crash_points:
            with open(tmp, "wb"):
                pass
        save_file(_tensors(seed), tmp, metadata={"config": json.dumps({"seed": seed})})
        if crash_points:
            data = Path(tmp).read_bytes()
            half = len(data) // 2
            with open(tmp, "r+b") as handle:
                handle.truncate(half)
                handle.seek(half)
                handle.write(data[half:])  # a kill here leaves half of the file

    write_atomic(path, write)


def test_client_state_file_killed_at_every_write_point(tmp_path: Path) -> None:
    path = tmp_path / "state" / "run-1" / "partition-0.safetensors"
    _write_state(path, seed=1)
    counted = tmp_path / "count.safetensors"
    _write_state(counted, seed=1)
    points = _count_points(lambda: _write_state(counted, 2, crash_points=True), tmp_path)
    assert points[-1] == "fsync" and "replace" in points
    seen = set()
    for n in range(1, len(points) + 1):
        assert _run_child(lambda: _write_state(path, 2, crash_points=True), n) == CRASHED
        got = load_file(str(path))
        match = [
            s for s in (1, 2) if all(np.array_equal(got[k], v) for k, v in _tensors(s).items())
        ]
        assert match, f"crash before {points[n - 1]} #{n}: state file is neither version"
        seen.add(match[0])
        _write_state(path, seed=1)  # back to the old version for the next kill
        young = _temp_files(path.parent)
        # a temp file this young may belong to a live writer: the next write keeps it...
        for name in young:
            old = time.time() - atomic.STALE_TEMP_AGE_S - 1
            os.utime(path.parent / name, (old, old))
        # ...and the one after the age limit removes it
        _write_state(path, seed=1)
        assert _temp_files(path.parent) == [], f"after crash #{n}"
    assert seen == {1, 2}


# --- nmoe.atomic ----------------------------------------------------------------------------------
def test_clean_temp_files_touches_only_its_own_stale_temp_files(tmp_path: Path) -> None:
    names = {
        ".results.json.abc_1234.tmp": True,  # ours, for results.json
        ".checkpoint.npz.zzzzzzzz.tmp": True,
        "..hidden.a1b2c3d4.tmp": True,  # ours, for a hidden file `.hidden`
        ".results.json.ABCDEFGH.tmp": False,  # mkstemp never uses capitals
        ".results.json.abc.tmp": False,
        "results.json.abcdefgh.tmp": False,  # no leading dot
        ".results.json.abcdefgh.tmp.bak": False,
        "notes.tmp": False,
        "results.json": False,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(tmp_path / "results.json")
    assert clean_temp_files(tmp_path) == []  # all fresh: a writer may still own them
    assert clean_temp_files(tmp_path, target="results.json", all_files=True) == [
        tmp_path / ".results.json.abc_1234.tmp"
    ]
    old = time.time() - atomic.STALE_TEMP_AGE_S - 1
    for name in names:
        if (tmp_path / name).exists():
            os.utime(tmp_path / name, (old, old))
    removed = {p.name for p in clean_temp_files(tmp_path)}
    assert removed == {n for n, ours in names.items() if ours and "results" not in n}
    assert (tmp_path / ".dir.abcdefgh.tmp").is_dir()
    assert (tmp_path / ".link.abcdefgh.tmp").is_symlink()
    assert (tmp_path / "results.json").read_text() == "x"
    assert clean_temp_files(tmp_path / "missing", all_files=True) == []


def test_write_atomic_fsyncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(tmp_path / "a" / "b" / "results.json", {"x": 1})
    # two new folders flushed in their parents, then the file, the rename and its folder
    assert calls == ["fsync-dir", "fsync-dir", "fsync-file", "replace", "fsync-dir"]
    assert json.loads((tmp_path / "a" / "b" / "results.json").read_text()) == {"x": 1}


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["results.json"]


# --- a resumed stage keeps its patience rule whole ------------------------------------------------
@pytest.mark.usefixtures("task_identity")
def test_a_resumed_stage_keeps_its_validation_history(tmp_path: Path) -> None:
    """The ServerApp dies in stage-1 round 3 (after round 2's checkpoint); the resumed run's
    patience rule holds the validation scores of every round, the ones before the crash
    included, so `extra.convergence` reports all of them and the best round among them."""
    from nmoe.config import compose_config
    from server_app.app import run_job

    from .live import RelayGrid, ServerDied, dies_in_stage1_round, live_fleet

    overrides = ["seal_payloads=false", "fe.rounds=4", "fe.patience=10", "fe.min_delta=0"]
    nodes = live_fleet(tmp_path, overrides)

    def job(name: str, *extra: str) -> list[str]:
        base = ["experiment=smoke", "gate=rangate", "partition=iid", "baselines=[]"]
        return [*base, *overrides, f"output_dir={tmp_path / name}", *extra]

    with pytest.raises(ServerDied):
        run_job(RelayGrid(nodes, dies_in_stage1_round(3)), compose_config(job("first")))
    saved = checkpoint.load(tmp_path / "first")
    # round r scores round r-1's aggregate (what its clients received): rounds 2.. score 1..
    assert saved.in_progress["round"] == 2 and len(saved.in_progress["patience"]["history"]) == 1
    results = run_job(
        RelayGrid(nodes), compose_config(job("second", f"resume={tmp_path / 'first'}"))
    )
    rows = [h for h in results["history"] if h["stage"] == "fe_ce"]
    assert [h["round"] for h in rows] == [1, 2, 3, 4]
    convergence = results["extra"]["convergence"]["fe_ce"]
    assert convergence["validation"] == [h["val-score"] for h in rows[1:]]
    best = max(range(1, 4), key=lambda i: (rows[i]["val-score"], -i))  # row i: aggregate i
    assert convergence["best_round"] == best and convergence["rounds_run"] == 4
