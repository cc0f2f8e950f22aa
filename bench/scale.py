"""Scaling: full three-stage runs with 10, 25, 50 and 100 simulated clients on digits.

    python bench/scale.py                        # 10 25 50 100 clients, the default NMoE config
    python bench/scale.py --clients 10 50        # other sizes

Each size is one `nmoe` run in its own process (stage 1, stage 2 with the shared expert's
FedAvg when configured, the gate cache and stage 3 when the configured gate trains, evaluation
of the configured gate; no baselines). The data: digits (1797 images; 20% held out as the
balanced global test set), partition=iid so every client gets the same share (about 14 images
each at 100 clients, 3 of them local test), dataset fractions at their defaults (the resolved
dataset config is recorded). While a run lasts, its whole
process tree (driver, Ray GCS/raylet/dashboard, workers) is sampled from /proc every 0.5 s
for peak memory (sum of RSS and of PSS) and CPU time.

Writes bench/results/scale.json: wall time, per-stage times, time per round of the federated
stages, peak memory per size; a least-squares line of time per round against clients with R^2.
Bars: 100 clients <= 15 min wall and peak memory (PSS sum) <= 8 GiB; time per round ~linear.
"""

from __future__ import annotations

import shutil
from typing import Any

import benchlib
from benchlib import (
    DEFAULT_NMOE_CONFIG,
    GIB,
    base_parser,
    linear_fit,
    machine_info,
    run_monitored,
    split_overrides,
    write_result,
)

NAME = "scale"
DEFAULT_CLIENTS = [10, 25, 50, 100]
TINY_CLIENTS = [2, 3]
DATA_OVERRIDES = ["dataset=digits", "partition=iid"]
TINY_OVERRIDES = [
    "fe.rounds=1",
    "fe.local_epochs=1",
    "expert.epochs=1",
    "expert.shared_rounds=1",
    "gate.rounds=1",
    "gate.local_epochs=1",
]
BAR_CLIENTS = 100
BAR_WALL_S = 15 * 60
BAR_MEMORY_BYTES = 8 * GIB
RUN_TIMEOUT_S = 3600  # a run still going after this is stopped (with its Ray processes)


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument(
        "--nmoe-config", default=DEFAULT_NMOE_CONFIG, help="Hydra overrides of the NMoE under test"
    )
    parser.add_argument("--overrides", default="", help="further Hydra overrides for every run")
    args = parser.parse_args()
    if args.tiny:
        args.clients = TINY_CLIENTS
    return args


def per_round(results: dict[str, Any]) -> dict[str, float]:
    """Seconds per round of each federated stage that ran (stage 1 and the trained gates): its
    wall time / the rounds its history holds (a patience rule may stop stage 1 early)."""
    from nmoe import gates
    from server_app.app import STAGE1_NAMES

    wall = results["wall_time_s"]
    stages = [STAGE1_NAMES[results["config"]["fe"]["method"]], *gates.trainable()]
    rounds = {s: sum(row["stage"] == s for row in results["history"]) for s in stages}
    return {s: wall[s] / rounds[s] for s in stages if s in wall and rounds[s]}


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    runs_dir = (args.out_dir / "runs" / NAME).resolve()
    shutil.rmtree(runs_dir, ignore_errors=True)
    from nmoe.results import load_results

    sizes = []
    for n in args.clients:
        job_dir = runs_dir / f"clients-{n}"
        overrides = [
            *split_overrides(args.nmoe_config),
            *DATA_OVERRIDES,
            f"simulation.num_clients={n}",
            "baselines=[]",
            "log_level=quiet",
            f"output_dir={job_dir}",
            f"hydra.run.dir={job_dir}",
            *(TINY_OVERRIDES if args.tiny else []),
            *split_overrides(args.overrides),
        ]
        run = run_monitored(
            [str(benchlib.NMOE_CLI), *overrides],
            runs_dir / f"clients-{n}.log",
            benchlib.REPO_ROOT,
            timeout_s=RUN_TIMEOUT_S,
        )
        results = load_results(job_dir / "results.json")
        train_sizes = [int(info["num_train"]) for info in results["nodes"]["info"].values()]
        test_sizes = [int(info["num_test"]) for info in results["nodes"]["info"].values()]
        sizes.append(
            {
                "clients": n,
                "run": run.as_dict(),
                "wall_time_s": results["wall_time_s"],
                "per_round_s": per_round(results),
                "stages_sum_s": sum(results["wall_time_s"].values()),
                "outside_stages_s": run.tree.wall_s - sum(results["wall_time_s"].values()),
                "train_samples_min_max": [min(train_sizes), max(train_sizes)],
                "test_samples_min_max": [min(test_sizes), max(test_sizes)],
                "dataset": results["config"]["dataset"],
                "nmoe_accuracy": {
                    "local": results["accuracy"]["nmoe"]["mean"],
                    "global": results["accuracy_global"]["nmoe"]["mean"],
                },
            }
        )
        print(
            f"[scale] {n} clients: {run.tree.wall_s:.1f}s wall, "
            f"per round {sizes[-1]['per_round_s']}, peak PSS {run.tree.peak_pss_bytes / GIB:.2f} "
            f"GiB (RSS sum {run.tree.peak_rss_bytes / GIB:.2f} GiB)",
            flush=True,
        )
    fits = {}
    for stage in sizes[0]["per_round_s"]:
        points = [
            (s["clients"], s["per_round_s"][stage]) for s in sizes if stage in s["per_round_s"]
        ]
        fits[stage] = linear_fit([float(x) for x, _ in points], [y for _, y in points])
    fits["total_wall"] = linear_fit(
        [float(s["clients"]) for s in sizes], [s["run"]["wall_s"] for s in sizes]
    )
    at_bar = [s for s in sizes if s["clients"] == BAR_CLIENTS]
    bars: dict[str, Any] = {
        "clients": BAR_CLIENTS,
        "measured": bool(at_bar),
        "wall_limit_s": BAR_WALL_S,
        "memory_limit_bytes": BAR_MEMORY_BYTES,
    }
    if at_bar:
        run = at_bar[0]["run"]
        bars.update(
            {
                "wall_s": run["wall_s"],
                "wall_met": run["wall_s"] <= BAR_WALL_S,
                "peak_pss_sum_bytes": run["peak_pss_sum_bytes"],
                "peak_rss_sum_bytes": run["peak_rss_sum_bytes"],
                "memory_met": run["peak_pss_sum_bytes"] <= BAR_MEMORY_BYTES,
            }
        )
    result = {
        "config": {
            "nmoe_config": args.nmoe_config,
            "overrides": args.overrides,
            "clients": args.clients,
            "data_overrides": DATA_OVERRIDES,
            "tiny": args.tiny,
            "dataset": sizes[0]["dataset"] if sizes else None,
        },
        "sizes": sizes,
        "fits_seconds_vs_clients": fits,
        "bars": bars,
        "notes": [
            "per_round_s = stage wall time (results.json wall_time_s) / the rounds in its history; "
            "the fits are least squares of per-round time (and of total wall) against the number "
            "of clients, with R^2.",
            "peak_pss_sum: proportional set size summed over the process tree (shared pages split "
            "among the processes sharing them), the bar's measure; peak_rss_sum counts shared "
            "pages once per process.",
            "outside_stages_s: process start, imports, Ray start, discovery, result writing and "
            "shutdown.",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    print(f"[scale] fits: {fits}\n[scale] bars: {bars}\n{path}", flush=True)


if __name__ == "__main__":
    main()
