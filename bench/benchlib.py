"""Shared helpers of the benchmark scripts: machine facts, result files, process-tree sampling.

Every benchmark writes `<out-dir>/<name>.json` through `write_result`, which adds the
machine (CPUs, memory, versions, load), the date, the git commit and the exact command.
`ProcessTreeMonitor` samples /proc for a process and all its descendants (Ray's GCS,
raylet and worker processes are children of the driver), so wall time, CPU time and
peak memory cover the whole simulation, not only the Python driver.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.executable).parent
NMOE_CLI = VENV_BIN / "nmoe"

# The NMoE configuration under test: the main job's preset (conf/experiment/digits_default.yaml);
# a benchmark's own keys (clients, seeds, partition, baselines) are set after it and win.
DEFAULT_NMOE_CONFIG = "experiment=digits_default"
# --tiny (smoke tests): one round or epoch of every training stage; a script adds its own keys.
TINY_SIZES: dict[str, Any] = {
    "fe.rounds": 1,
    "fe.local_epochs": 1,
    "expert.epochs": 1,
    "expert.shared_rounds": 1,
    "gate.rounds": 1,
    "gate.local_epochs": 1,
}

BYTES_PER_FLOAT32 = 4
KIB = 1024
GIB = 1024**3
SAMPLE_INTERVAL_S = 0.5
KILL_GRACE_S = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# /proc/<pid>/stat fields after the ")" that closes the command name (0-based):
# state=0, ppid=1, utime=11, stime=12, starttime=19, rss=21 (pages).
STAT_PPID, STAT_UTIME, STAT_STIME, STAT_START, STAT_RSS = 1, 11, 12, 19, 21


# ---------------------------------------------------------------------------- machine and results
def _meminfo_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _git(*args: str) -> str | None:
    """Output of a git command in the repository, None if git is unavailable."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPUs, memory, OS, Python/torch/flwr/ray versions, load average and git state, now."""
    memory = _meminfo_total_bytes()
    status = _git("status", "--porcelain")
    return {
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": memory,
        "mem_total_gib": round(memory / GIB, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "flwr": _version("flwr"),
        "ray": _version("ray"),
        "load_average_1_5_15": list(os.getloadavg()),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def command_line() -> str:
    """The exact command that started this benchmark."""
    return shlex.join([sys.executable, *sys.argv])


def write_result(
    out_dir: Path, name: str, payload: dict[str, Any], started: dict[str, Any]
) -> Path:
    """Write `<out_dir>/<name>.json`: machine at start and end, command, then the payload."""
    from nmoe.atomic import write_json_atomic

    document = {
        "benchmark": name,
        "command": command_line(),
        "machine": started,
        "load_average_at_end": list(os.getloadavg()),
        **payload,
    }
    return write_json_atomic(out_dir / f"{name}.json", _json_safe(document))


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (JSON has no NaN); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: output folder and the tiny (smoke-test) size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="folder for <name>.json, plots and run folders (default: bench/results)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smallest size that exercises every code path (smoke test); numbers are meaningless",
    )
    return parser


def split_overrides(text: str) -> list[str]:
    """Hydra overrides from one string (`"gate=fedgate gate.k=3"`)."""
    return shlex.split(text)


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Hydra overrides from config keys and values (`{"fe.rounds": 1}` -> `["fe.rounds=1"]`)."""
    return [f"{key}={value}" for key, value in values.items()]


def expose_bench_to_ray_workers() -> None:
    """Put bench/ on PYTHONPATH before Ray starts: workers then import the bench's own
    apps by reference (as they do the project's), instead of unpickling them by value."""
    paths = [str(BENCH_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


# ---------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for fewer than 2 values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = intercept + slope * x and its coefficient of determination R^2."""
    n = len(xs)
    if n < 2:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "points": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "points": n,
    }


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (local, global) no other point matches or beats on both axes, beating on one
    (equal points both stay), by decreasing first coordinate."""

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points.values())

    return sorted(
        (name for name, p in points.items() if not dominated(p)), key=lambda n: -points[n][0]
    )


# ---------------------------------------------------------------------------- process tree
def _read_stat(pid: str) -> tuple[int, int, int, int] | None:
    """(ppid, cpu ticks utime+stime, start time, rss pages) of one process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (
        int(fields[STAT_PPID]),
        int(fields[STAT_UTIME]) + int(fields[STAT_STIME]),
        int(fields[STAT_START]),
        int(fields[STAT_RSS]),
    )


def _pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages divided among their users); 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


def _process_table() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, cpu ticks, start time, rss pages) of every process now."""
    table: dict[int, tuple[int, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(entry)
            if stat is not None:
                table[int(entry)] = stat
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, int, int]]) -> list[int]:
    """`root` (if alive) and every process below it, parents before children."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_tree(root: int, grace_s: float = KILL_GRACE_S) -> list[int]:
    """Stop a process this benchmark started and everything below it (Ray's GCS, raylet and
    workers are children of the driver): SIGTERM, then SIGKILL after `grace_s`. Returns the
    pids signalled."""
    pids = _descendants(root, _process_table())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not any(Path(f"/proc/{pid}").exists() for pid in pids):
                return pids
            time.sleep(SAMPLE_INTERVAL_S)
    return pids


@dataclass
class TreeStats:
    """What a `ProcessTreeMonitor` saw between start and stop."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_processes: int = 0
    samples: int = 0
    pss_sampled: bool = True

    def as_dict(self) -> dict[str, Any]:
        pss = self.peak_pss_bytes if self.pss_sampled else None
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "peak_rss_sum_bytes": self.peak_rss_bytes,
            "peak_rss_sum_gib": round(self.peak_rss_bytes / GIB, 3),
            "peak_pss_sum_bytes": pss,
            "peak_pss_sum_gib": None if pss is None else round(pss / GIB, 3),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
        }


@dataclass
class ProcessTreeMonitor:
    """Samples `root_pid` and its descendants every `interval_s` in a background thread.

    CPU time is the sum over processes of (last seen utime+stime - utime+stime at start);
    a process that exits loses at most one interval of CPU. Memory peaks are sums over the
    tree of RSS (counts shared pages once per process: an over-estimate) and of PSS
    (shared pages divided among the processes sharing them). Use as a context manager.
    """

    root_pid: int = field(default_factory=os.getpid)
    interval_s: float = SAMPLE_INTERVAL_S
    with_pss: bool = True
    stats: TreeStats = field(default_factory=TreeStats)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-monitor", daemon=True)
        self._baseline: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], int] = {}
        self._started = 0.0
        self.stats.pss_sampled = self.with_pss

    def _tree(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(pid, start time) -> (cpu ticks, rss pages) for the root and all its descendants."""
        table = _process_table()
        return {
            (pid, table[pid][2]): (table[pid][1], table[pid][3])
            for pid in _descendants(self.root_pid, table)
        }

    def sample(self) -> None:
        """Take one sample now (also called at start and stop)."""
        tree = self._tree()
        for key, (ticks, _) in tree.items():
            self._baseline.setdefault(key, ticks)
            self._last[key] = ticks
        rss = sum(pages for _, pages in tree.values()) * PAGE_SIZE
        pss = sum(_pss_bytes(pid) for pid, _ in tree) if self.with_pss else 0
        s = self.stats
        s.peak_rss_bytes = max(s.peak_rss_bytes, rss)
        s.peak_pss_bytes = max(s.peak_pss_bytes, pss)
        s.peak_processes = max(s.peak_processes, len(tree))
        s.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> ProcessTreeMonitor:
        self._started = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.stats.wall_s = time.perf_counter() - self._started
        self.stats.cpu_s = sum(self._last[k] - self._baseline[k] for k in self._last) / CLOCK_TICKS


# ---------------------------------------------------------------------------- subprocesses
@dataclass
class CommandRun:
    """A finished subprocess: its command, exit code, log file and what the monitor saw."""

    command: list[str]
    returncode: int
    log_path: Path
    tree: TreeStats

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": shlex.join(self.command),
            "returncode": self.returncode,
            "log": str(self.log_path),
            **self.tree.as_dict(),
        }


def run_monitored(
    command: list[str],
    log_path: Path,
    cwd: Path,
    with_pss: bool = True,
    timeout_s: float | None = None,
) -> CommandRun:
    """Run `command` (stdout+stderr to `log_path`), sampling its process tree; raise if it fails
    or outlives `timeout_s` (then it and everything it started are stopped)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(command)}\n  (log: {log_path})", flush=True)
    timed_out = False
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        with ProcessTreeMonitor(process.pid, with_pss=with_pss) as monitor:
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_tree(process.pid)
                returncode = process.wait()
    run = CommandRun(command, returncode, log_path, monitor.stats)
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        reason = f"timed out after {timeout_s} s" if timed_out else f"exit code {returncode}"
        raise RuntimeError(f"command failed ({reason}): {shlex.join(command)}\n{tail}")
    return run


def run_logged(command: list[str], out: Path, timeout_s: float) -> tuple[int, float]:
    """Run one job in `out` with its output in `out/job.log`, stopped with everything it started
    (Ray) after `timeout_s`. Returns (exit code, wall seconds)."""
    started = time.monotonic()
    with (out / "job.log").open("w") as log:
        process = subprocess.Popen(command, cwd=out, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            returncode = process.wait()
    return returncode, time.monotonic() - started


def completed_results(out: Path) -> dict[str, Any] | None:
    """The results.json of a job folder if its run completed, else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("status") == "completed" else None


def run_resumable(
    command: list[str], out: Path, timeout_s: float, label: str, attempts: int = 1
) -> dict[str, Any]:
    """One `nmoe` job in `out`: kept when the folder already holds completed results, resumed
    from its checkpoint when it holds one, tried up to `attempts` times while it leaves no
    completed results (a retry resumes; under heavy load Ray's start can time out). Returns wall
    seconds, exit status and the command of each attempt."""
    from server_app.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE

    if completed_results(out) is not None:
        print(f"[{label}] completed before, kept", flush=True)
        return {"seconds": 0.0, "exit": 0, "kept": True}
    out.mkdir(parents=True, exist_ok=True)
    tries = []
    for attempt in range(1, attempts + 1):
        resume = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
        full = [*command, f"resume={out}"] if resume else list(command)
        returncode, seconds = run_logged(full, out, timeout_s)
        tries.append({"seconds": round(seconds, 1), "exit": returncode, "command": full})
        print(f"[{label}] attempt {attempt}: exit {returncode} in {seconds:.0f}s", flush=True)
        if completed_results(out) is not None:
            break
    return {
        "seconds": round(sum(t["seconds"] for t in tries), 1),
        "exit": tries[-1]["exit"],
        "attempts": tries,
    }
