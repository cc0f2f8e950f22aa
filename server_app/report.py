"""Plots of one results.json and the summary of a Hydra sweep (`nmoe-report PATH`).

`write_plots` draws PNGs beside a job's results.json; `summarize_sweep` groups the
jobs of a sweep by their overrides (all but `seed`) and writes mean and sample
standard deviation over seeds of every method's accuracy to summary.csv/summary.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nmoe.results import load_results

RESULTS_FILE = "results.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOT_FILES = {
    "rounds": "accuracy_rounds.png",
    "clients": "accuracy_per_client.png",
    "routing": "routing_heatmap.png",
    "bytes": "comm_bytes.png",
}
SEED_KEY = "seed"
# Config keys that never tell jobs apart (used when a job has no .hydra/overrides.yaml).
NON_GROUPING_KEYS = frozenset({SEED_KEY, "output_dir", "state_key"})
NO_OVERRIDES_LABEL = "(no overrides)"
ACC_SUFFIX = "-acc"
LOSS_KEY = "loss"
SPLITS = (("accuracy", "local test"), ("accuracy_global", "global test"))
CSV_COLUMNS = (
    "group",
    "method",
    "n_seeds",
    "seeds",
    "local_mean",
    "local_std",
    "global_mean",
    "global_std",
)

DPI = 120
WIDE_FIGSIZE = (11.0, 4.5)
SQUARE_FIGSIZE = (6.5, 5.5)
GROUP_WIDTH = 0.8  # share of an x slot filled by one group of bars
ANNOTATE_MAX_CELLS = 400  # write counts into heatmap cells up to this many cells
MARKER_SIZE = 4
LEGEND_OUTSIDE = (1.02, 1.0)  # axes coordinates: just right of the plot, top-aligned
DECIMALS = 4


# ---------------------------------------------------------------------------- plots
def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _round_series(
    history: list[dict[str, Any]],
) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """`(stage, metric) -> (rounds, per-round mean)` for every numeric metric of the history."""
    values: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in history:
        for key, value in row.items():
            if key not in ("stage", "round", "replies", "client") and isinstance(
                value, (int, float)
            ):
                values[(str(row["stage"]), key)][int(row["round"])].append(float(value))
    return {
        key: (sorted(by_round), [statistics.fmean(by_round[r]) for r in sorted(by_round)])
        for key, by_round in values.items()
    }


def plot_rounds(results: dict[str, Any], path: Path) -> Path | None:
    """Accuracy (left) and training loss (right) per round of every stage in the history."""
    series = _round_series(results.get("history", []))
    if not series:
        return None
    fig = Figure(figsize=WIDE_FIGSIZE)
    acc_ax, loss_ax = fig.subplots(1, 2)
    for (stage, metric), (rounds, values) in series.items():
        if metric.endswith(ACC_SUFFIX):
            acc_ax.plot(
                rounds, values, marker="o", markersize=MARKER_SIZE, label=f"{stage}: {metric}"
            )
        elif metric == LOSS_KEY:
            loss_ax.plot(rounds, values, marker="o", markersize=MARKER_SIZE, label=stage)
    for ax, title, ylabel in (
        (acc_ax, "Accuracy per round", "accuracy"),
        (loss_ax, "Training loss per round", "loss"),
    ):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_per_client(results: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars: each method's accuracy per client, on local and on global test data."""
    methods = list(results.get("accuracy", {}))
    if not methods:
        return None
    fig = Figure(figsize=WIDE_FIGSIZE)
    axes = fig.subplots(1, len(SPLITS), sharey=True)
    width = GROUP_WIDTH / len(methods)
    for ax, (key, title) in zip(axes, SPLITS, strict=True):
        block = results.get(key, {})
        seen: set[int] = set()
        for index, method in enumerate(methods):
            entry = block.get(method, {})
            values = entry.get("per_client", [])
            clients = entry.get("clients", list(range(len(values))))  # a dropped client has no bar
            seen.update(clients)
            offset = (index - (len(methods) - 1) / 2) * width
            ax.bar(np.asarray(clients) + offset, values, width, label=method)
        ax.set_xticks(sorted(seen))
        ax.set_xlabel("client")
        ax.set_title(f"Accuracy per client ({title})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=LEGEND_OUTSIDE)
    return _save(fig, path)


def plot_routing(results: dict[str, Any], path: Path) -> Path | None:
    """Heatmap: how many test samples requester i routed to expert j under the configured gate."""
    gate = str(results.get("config", {}).get("gate", {}).get("method", ""))
    counts = results.get("routing_counts", {}).get(gate)
    if not counts:
        return None
    requesters = sorted(counts, key=int)
    num_experts = max(len(row) for row in counts.values())
    matrix = np.zeros((len(requesters), num_experts))
    for row, pid in enumerate(requesters):
        matrix[row, : len(counts[pid])] = counts[pid]
    expert_labels = [str(j) for j in range(num_experts)]
    if results.get("config", {}).get("expert", {}).get("shared_expert") and num_experts > len(
        requesters
    ):
        expert_labels[-1] = "shared"
    fig = Figure(figsize=SQUARE_FIGSIZE)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="samples routed")
    ax.set_xticks(np.arange(num_experts), expert_labels)
    ax.set_yticks(np.arange(len(requesters)), requesters)
    ax.set_xlabel("expert")
    ax.set_ylabel("requesting client")
    ax.set_title(f"Routing of local test samples ({gate})")
    if matrix.size <= ANNOTATE_MAX_CELLS:
        middle = matrix.max() / 2
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                f"{int(value)}",
                ha="center",
                va="center",
                fontsize="small",
                color="black" if value > middle else "white",
            )
    return _save(fig, path)


def plot_bytes(results: dict[str, Any], path: Path) -> Path | None:
    """Bytes up (clients to server) and down (server to clients) per stage, log scale."""
    ledger = results.get("comm_bytes", {})
    if not ledger:
        return None
    stages = list(ledger)
    x = np.arange(len(stages))
    width = GROUP_WIDTH / 2
    fig = Figure(figsize=WIDE_FIGSIZE)
    ax = fig.subplots()
    for index, direction in enumerate(("up", "down")):
        ax.bar(
            x + (index - 0.5) * width,
            [ledger[s].get(direction, 0) for s in stages],
            width,
            label=direction,
        )
    ax.set_yscale("log")
    ax.set_xticks(x, stages, rotation=30, ha="right")
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("Communication per stage")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write_plots(output_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write the PNGs of one job beside its results.json; plots without data are skipped."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    drawn = (
        plot_rounds(results, output_dir / PLOT_FILES["rounds"]),
        plot_per_client(results, output_dir / PLOT_FILES["clients"]),
        plot_routing(results, output_dir / PLOT_FILES["routing"]),
        plot_bytes(results, output_dir / PLOT_FILES["bytes"]),
    )
    return [path for path in drawn if path is not None]


# ---------------------------------------------------------------------------- sweep summary
@dataclass
class Job:
    """One job of a sweep: its folder, results and the overrides that set it apart."""

    directory: Path
    results: dict[str, Any]
    overrides: list[str] | None  # None when the job has no .hydra/overrides.yaml

    @property
    def seed(self) -> Any:
        return self.results.get("config", {}).get(SEED_KEY)


def find_results(root: str | Path) -> list[Path]:
    """Every results.json in or under `root`, sorted."""
    return sorted(Path(root).rglob(RESULTS_FILE))


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _load_job(results_path: Path) -> Job:
    overrides_path = results_path.parent / OVERRIDES_FILE
    overrides = None
    if overrides_path.is_file():
        overrides = [str(o) for o in yaml.safe_load(overrides_path.read_text()) or []]
    return Job(results_path.parent, load_results(results_path), overrides)


def group_labels(jobs: list[Job]) -> list[str]:
    """A label per job: its overrides without `seed`; for jobs without overrides.yaml,
    the config values that differ between such jobs (seed and output paths ignored)."""
    flat = [_flatten(job.results.get("config", {})) for job in jobs]
    from_config = [i for i, job in enumerate(jobs) if job.overrides is None]
    keys = sorted({key for i in from_config for key in flat[i]} - NON_GROUPING_KEYS)
    varying = [key for key in keys if len({repr(flat[i].get(key)) for i in from_config}) > 1]
    labels = []
    for job, config in zip(jobs, flat, strict=True):
        if job.overrides is not None:
            parts = sorted(o for o in job.overrides if _override_key(o) != SEED_KEY)
        else:
            parts = [f"{key}={config.get(key)}" for key in varying]
        labels.append(" ".join(parts) or NO_OVERRIDES_LABEL)
    return labels


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summary_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per (group, method): seeds, mean and sample std of local and global accuracy."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for label, job in zip(group_labels(jobs), jobs, strict=True):
        groups[label].append(job)
    rows = []
    for label in sorted(groups):
        members = groups[label]
        methods = list(dict.fromkeys(m for job in members for m in job.results.get("accuracy", {})))
        for method in methods:
            scored = [job for job in members if method in job.results.get("accuracy", {})]
            local = [float(job.results["accuracy"][method]["mean"]) for job in scored]
            glob = [
                float(job.results["accuracy_global"][method]["mean"])
                for job in scored
                if method in job.results.get("accuracy_global", {})
            ]
            rows.append(
                {
                    "group": label,
                    "method": method,
                    "n_seeds": len(scored),
                    "seeds": " ".join(str(job.seed) for job in scored),
                    "local_mean": statistics.fmean(local),
                    "local_std": _std(local),
                    "global_mean": statistics.fmean(glob) if glob else math.nan,
                    "global_std": _std(glob),
                }
            )
    return rows


def _markdown(sweep_dir: Path, rows: list[dict[str, Any]], num_jobs: int) -> str:
    def cell(mean: float, std: float) -> str:
        return f"{mean:.{DECIMALS}f}" + ("" if math.isnan(std) else f" ± {std:.{DECIMALS}f}")

    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{num_jobs} jobs. Accuracy: mean ± sample standard deviation over seeds "
        "(n = number of seeds).",
        "",
        "| group | method | n | seeds | local accuracy | global accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['group']} | {row['method']} | {row['n_seeds']} | {row['seeds']} | "
            f"{cell(row['local_mean'], row['local_std'])} | "
            f"{cell(row['global_mean'], row['global_std'])} |"
        )
    return "\n".join(lines) + "\n"


def summarize_sweep(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write summary.csv and summary.md into `sweep_dir` for every results.json under it."""
    sweep_dir = Path(sweep_dir)
    paths = find_results(sweep_dir)
    if not paths:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {sweep_dir}")
    jobs = [_load_job(path) for path in paths]
    rows = summary_rows(jobs)
    csv_path = sweep_dir / SUMMARY_CSV
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path = sweep_dir / SUMMARY_MD
    md_path.write_text(_markdown(sweep_dir, rows, len(jobs)))
    return csv_path, md_path


# ---------------------------------------------------------------------------- console script
def main(argv: list[str] | None = None) -> int:
    """`nmoe-report PATH`: replot one job (PATH holds results.json) or a sweep and its summary."""
    parser = argparse.ArgumentParser(prog="nmoe-report", description=main.__doc__)
    parser.add_argument(
        "path", type=Path, help=f"a job folder (with {RESULTS_FILE}) or a sweep folder"
    )
    args = parser.parse_args(argv)
    path: Path = args.path
    if path.is_file() and path.name == RESULTS_FILE:
        path = path.parent
    if (path / RESULTS_FILE).is_file():
        for plot in write_plots(path, load_results(path / RESULTS_FILE)):
            print(plot)
        return 0
    paths = find_results(path) if path.is_dir() else []
    if not paths:
        parser.error(f"no {RESULTS_FILE} in or under '{path}'")
    for results_path in paths:
        for plot in write_plots(results_path.parent, load_results(results_path)):
            print(plot)
    for summary in summarize_sweep(path):
        print(summary)
    return 0
