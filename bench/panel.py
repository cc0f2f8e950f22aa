"""The benchmark panel: every method on a panel of federated settings, every dataset, 3 seeds.

    python bench/panel.py                              # every panel dataset and setting, seeds 0-2
    python bench/panel.py --datasets digits --seeds 0  # a part of it
    python bench/panel.py --skip-run                   # re-analyse the jobs in the run folder
    python bench/panel.py --tiny                       # smoke size: digits, dir0.3, seed 0, 3
                                                       # clients, 2 rounds (numbers meaningless)

One job is one `nmoe` run of a dataset's panel preset (conf/experiment/panel_<dataset>.yaml: the
NMoE configuration under test, stage 1 trained to convergence by a patience rule, every
baseline with a schedule of its own, the oracle router) on one setting and seed; every method of
a job uses the same data split and the same F. The datasets: those of the registry
(nmoe/datasets.py) that have a panel preset. Settings: Dirichlet 0.1 / 0.3 / 1.0 with 10
clients, pathological 2 classes per client with 10 clients, a ring of 20 clients at Dirichlet
0.1, and (Fashion-MNIST only) 50 clients at Dirichlet 0.3.

Writes bench/results/panel.json (machine, load, commit, the resolved config of every cell, mean
and sample std over seeds of every method's local and global accuracy, the share of the oracle's
headroom each gate closes on the global test, (gate - fedavg) / (oracle - fedavg), the Pareto
front of (local, global) mean accuracy without the references, and the bars of the routing
issue per setting), a local-vs-global scatter per dataset (panel_<dataset>.png) and the
README's tables (panel.md). The jobs' folders (results.json, logs) stay in
<out-dir>/runs/panel/<dataset>/<setting>/seed<k>/, where bench/comm.py reads them.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import base_parser, machine_info, mean_std, pareto_front, write_result

from nmoe.config import CONF_DIR, MODEL_BASELINES
from nmoe.datasets import DATASETS

NAME = "panel"
SETTINGS: dict[str, list[str]] = {
    "dir0.1": ["partition=dirichlet", "partition.alpha=0.1", "simulation.num_clients=10"],
    "dir0.3": ["partition=dirichlet", "partition.alpha=0.3", "simulation.num_clients=10"],
    "dir1.0": ["partition=dirichlet", "partition.alpha=1.0", "simulation.num_clients=10"],
    "path2": [
        "partition=pathological",
        "partition.classes_per_client=2",
        "simulation.num_clients=10",
    ],
    "ring20": [
        "partition=dirichlet",
        "partition.alpha=0.1",
        "topology=ring",
        "simulation.num_clients=20",
    ],
    "dir0.3-50": ["partition=dirichlet", "partition.alpha=0.3", "simulation.num_clients=50"],
}
COMMON_SETTINGS = ["dir0.1", "dir0.3", "dir1.0", "path2", "ring20"]
EXTRA_SETTINGS = {"fashion_mnist": ["dir0.3-50"]}


def preset(dataset: str) -> str:
    """The name of a dataset's panel preset (conf/experiment/<name>.yaml)."""
    return f"panel_{dataset}"


# Every dataset of the registry that has a panel preset.
DATASET_SETTINGS = {
    name: COMMON_SETTINGS + EXTRA_SETTINGS.get(name, [])
    for name in DATASETS
    if (CONF_DIR / "experiment" / f"{preset(name)}.yaml").is_file()
}
PERSONAL_BASELINES = ("shared_fe_own_head", "local_only")
# local_head: with expert.local_head; own_model: with expert.own_model=head_and_expert
PERSONAL = ("local_expert", "local_head", "own_model", *PERSONAL_BASELINES)
ORACLE, FEDAVG, NMOE, CENTRALIZED = "oracle_router", "fedavg", "nmoe", "centralized"
TASK_PRIOR = "fedavg_task_prior"  # fedavg with wave 3's label-shift correction, no experts
REFERENCES = (ORACLE, CENTRALIZED)  # not deployable methods: left out of the Pareto front
if not {FEDAVG, TASK_PRIOR, *PERSONAL_BASELINES, *REFERENCES} <= set(MODEL_BASELINES):
    raise ImportError(f"panel.py names baselines that nmoe.config lacks: {MODEL_BASELINES}")
HEADROOM_MIN = 0.02  # the headroom bar applies where oracle - fedavg >= 2 points
BAR_GLOBAL_MARGIN, BAR_LOCAL_MARGIN, BAR_HEADROOM = 0.01, 0.01, 0.5
DEFAULTS = {"datasets": list(DATASET_SETTINGS), "seeds": ["0", "1", "2"], "parallel": 2}
TINY = {"datasets": ["digits"], "seeds": ["0"], "settings": ["dir0.3"], "parallel": 1}
# Tiny: 3 clients, two rounds of stage 1 and of the gates (FedGate averages its head in round
# 2), one epoch or round of everything else.
TINY_OVERRIDES = benchlib.as_overrides(
    {
        **benchlib.TINY_SIZES,
        "simulation.num_clients": 3,
        "fe.rounds": 2,
        "gate.rounds": 2,
        "baseline.epochs": 1,
        "baseline.fedavg_rounds": 1,
    }
)
JOB_TIMEOUT_S = 3600
DPI, FIGSIZE = 120, (6.0, 5.0)


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DEFAULTS["datasets"]))
    parser.add_argument("--settings", default="", help="comma list (default: every setting)")
    parser.add_argument("--seeds", default=",".join(DEFAULTS["seeds"]))
    parser.add_argument(
        "--parallel",
        type=int,
        default=DEFAULTS["parallel"],
        help="jobs run at once (each a whole simulation)",
    )
    parser.add_argument("--overrides", default="", help="further Hydra overrides for every job")
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=JOB_TIMEOUT_S,
        help="seconds one attempt of a job may take (the 50-client setting needs more)",
    )
    parser.add_argument("--skip-run", action="store_true", help="only re-analyse the run folder")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="how the jobs were run (code, load, schedule), kept in panel.json; repeatable",
    )
    args = parser.parse_args()
    args.datasets = args.datasets.split(",")
    args.seeds = args.seeds.split(",")
    args.settings = args.settings.split(",") if args.settings else []
    if args.tiny:
        args.datasets, args.seeds = TINY["datasets"], TINY["seeds"]
        args.settings, args.parallel = TINY["settings"], TINY["parallel"]
    return args


# ---------------------------------------------------------------------------- jobs
def run_dir(out_dir: Path) -> Path:
    """The folder of the panel's job folders."""
    return out_dir / "runs" / NAME


def jobs_of(args: Any) -> list[dict[str, Any]]:
    jobs = []
    for dataset in args.datasets:
        for setting in DATASET_SETTINGS[dataset]:
            if args.settings and setting not in args.settings:
                continue
            for seed in args.seeds:
                jobs.append({"dataset": dataset, "setting": setting, "seed": int(seed)})
    return jobs


def job_dir(run_dir: Path, job: dict[str, Any]) -> Path:
    return run_dir / job["dataset"] / job["setting"] / f"seed{job['seed']}"


def run_job(job: dict[str, Any], run_dir: Path, args: Any) -> dict[str, Any]:
    """One `nmoe` run (kept if completed before, resumed from its checkpoint, retried while it
    leaves no completed results); returns wall seconds and status."""
    command = [
        str(benchlib.NMOE_CLI),
        f"experiment={preset(job['dataset'])}",
        *SETTINGS[job["setting"]],
        f"seed={job['seed']}",
        f"output_dir={job_dir(run_dir, job)}",
        "log_level=quiet",
        *(TINY_OVERRIDES if args.tiny else []),
        *benchlib.split_overrides(args.overrides),
    ]
    label = f"panel {job['dataset']} {job['setting']} seed {job['seed']}"
    run = benchlib.run_resumable(command, job_dir(run_dir, job), args.job_timeout, label, 3)
    return {**job, **run}


# ---------------------------------------------------------------------------- analysis
def load_job(run_dir: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    return benchlib.completed_results(job_dir(run_dir, job))


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """method -> mean/std over seeds of the local and global mean accuracy."""
    methods = sorted({m for r in results for m in r["accuracy"]})
    table = {}
    for method in methods:
        local = [r["accuracy"][method]["mean"] for r in results if method in r["accuracy"]]
        glob = [
            r["accuracy_global"][method]["mean"]
            for r in results
            if method in r.get("accuracy_global", {})
        ]
        (lm, ls), (gm, gs) = mean_std(local), mean_std(glob)
        table[method] = {
            "local_mean": lm,
            "local_std": ls,
            "global_mean": gm,
            "global_std": gs,
            "local": local,
            "global": glob,
        }
    return table


def front(table: dict[str, Any]) -> list[str]:
    """The Pareto front of the methods' (local, global) mean accuracy, references left out."""
    points = {
        m: (row["local_mean"], row["global_mean"])
        for m, row in table.items()
        if m not in REFERENCES and not math.isnan(row["global_mean"])
    }
    return pareto_front(points)


def headroom_share(method: float, fedavg: float, oracle: float) -> float | None:
    """(method - fedavg) / (oracle - fedavg); None where that headroom is under HEADROOM_MIN."""
    room = oracle - fedavg
    return None if room < HEADROOM_MIN else (method - fedavg) / room


def headroom(table: dict[str, Any], gate: str) -> float | None:
    """`headroom_share` of `gate` on global accuracy; None where a method is missing."""
    if ORACLE not in table or FEDAVG not in table or gate not in table:
        return None
    return headroom_share(*(table[m]["global_mean"] for m in (gate, FEDAVG, ORACLE)))


def bars(table: dict[str, Any]) -> dict[str, Any]:
    """The routing issue's bars for `nmoe` in one setting (means over seeds)."""
    out: dict[str, Any] = {}
    if NMOE not in table:
        return out
    nmoe = table[NMOE]
    if FEDAVG in table:
        gap = nmoe["global_mean"] - table[FEDAVG]["global_mean"]
        out["global_vs_fedavg"] = {"gap": gap, "met": gap >= -BAR_GLOBAL_MARGIN}
    personal = {m: table[m]["local_mean"] for m in PERSONAL if m in table}
    if personal:
        best = max(personal, key=personal.get)
        gap = nmoe["local_mean"] - personal[best]
        out["local_vs_best_personal"] = {"best": best, "gap": gap, "met": gap >= -BAR_LOCAL_MARGIN}
    share = headroom(table, NMOE)
    out["headroom_share"] = {
        "share": share,
        "met": None if share is None else share >= BAR_HEADROOM,
    }
    out["on_pareto_front"] = NMOE in front(table)
    for name, other in (
        ("gap_to_fedavg_task_prior", TASK_PRIOR),
        ("gap_to_centralized", CENTRALIZED),
    ):
        if other not in table:
            continue
        out[name] = {
            "local": nmoe["local_mean"] - table[other]["local_mean"],
            "global": nmoe["global_mean"] - table[other]["global_mean"],
        }
    return out


def bars_note() -> str:
    """The bars as `bars` computes them, in words (kept in panel.json's notes)."""
    return (
        f"Bars (routing issue): nmoe global >= fedavg - {100 * BAR_GLOBAL_MARGIN:g} pt; nmoe "
        f"local >= best of {' / '.join(PERSONAL)} - {100 * BAR_LOCAL_MARGIN:g} pt; headroom "
        f"closed >= {100 * BAR_HEADROOM:g}% where oracle_router - fedavg >= "
        f"{100 * HEADROOM_MIN:g} pts."
    )


def convergence(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How long each stage that trains to convergence ran (rounds or epochs, per seed)."""
    out: dict[str, list[Any]] = {}
    for r in results:
        for stage, info in r.get("extra", {}).get("convergence", {}).items():
            out.setdefault(stage, []).append(info)
    return out


def cell(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if std is None or math.isnan(std) else f" ± {std:.3f}")


def markdown(analysis: dict[str, Any]) -> str:
    """One table per dataset and setting, and the bars table, for the README."""
    lines = []
    for dataset, settings in analysis.items():
        for setting, entry in settings.items():
            table = entry["methods"]
            lines += [
                f"**{dataset}, {setting}** ({entry['seeds']} seeds)",
                "",
                "| method | local | global | headroom closed |",
                "|---|---|---|---|",
            ]
            order = sorted(table, key=lambda m: -table[m]["global_mean"])
            for method in order:
                row = table[method]
                share = headroom(table, method)
                shown = (
                    "-" if share is None or method in (ORACLE, FEDAVG) else f"{100 * share:.0f}%"
                )
                name = f"**{method}**" if method == NMOE else method
                lines.append(
                    f"| {name} | {cell(row['local_mean'], row['local_std'])} | "
                    f"{cell(row['global_mean'], row['global_std'])} | {shown} |"
                )
            lines.append("")
    lines += [
        "| dataset | setting | global - fedavg (>= -1 pt) | local - best personal (>= -1 pt) "
        f"| headroom closed (>= 50%) | local / global - {TASK_PRIOR} (no bar) |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, settings in analysis.items():
        for setting, entry in settings.items():
            b = entry["bars"]
            g, loc, h = (
                b.get("global_vs_fedavg"),
                b.get("local_vs_best_personal"),
                b.get("headroom_share"),
            )

            def verdict(ok: bool | None) -> str:
                return "n/a" if ok is None else ("met" if ok else "**missed**")

            gtxt = "-" if g is None else f"{100 * g['gap']:+.1f} ({verdict(g['met'])})"
            ltxt = (
                "-"
                if loc is None
                else f"{100 * loc['gap']:+.1f} vs {loc['best']} ({verdict(loc['met'])})"
            )
            htxt = (
                "n/a (oracle - fedavg < 2 pts)"
                if h is None or h["share"] is None
                else f"{100 * h['share']:.0f}% ({verdict(h['met'])})"
            )
            t = b.get("gap_to_fedavg_task_prior")
            ttxt = "-" if t is None else f"{100 * t['local']:+.1f} / {100 * t['global']:+.1f}"
            lines.append(f"| {dataset} | {setting} | {gtxt} | {ltxt} | {htxt} | {ttxt} |")
    return "\n".join(lines) + "\n"


def plot(analysis: dict[str, Any], out_dir: Path) -> list[Path]:
    """Local vs global accuracy, one panel per setting, one figure per dataset."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for dataset, settings in analysis.items():
        # one colour per method, the same in every setting: tab20's ten dark hues, then the light
        methods = sorted({m for entry in settings.values() for m in entry["methods"]})
        colour = {
            m: colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20) for i, m in enumerate(methods)
        }
        fig = Figure(figsize=(FIGSIZE[0] * len(settings), FIGSIZE[1]))
        axes = fig.subplots(1, len(settings), squeeze=False)[0]
        for ax, (setting, entry) in zip(axes, settings.items(), strict=True):
            for method, row in sorted(entry["methods"].items()):
                ax.errorbar(
                    row["local_mean"],
                    row["global_mean"],
                    xerr=row["local_std"] if not math.isnan(row["local_std"]) else None,
                    yerr=row["global_std"] if not math.isnan(row["global_std"]) else None,
                    color=colour[method],
                    marker="*" if method == NMOE else "o",
                    markersize=12 if method == NMOE else 6,
                    linestyle="none",
                    label=method,
                    capsize=2,
                )
            ax.set_title(f"{dataset}: {setting}")
            ax.set_xlabel("local test accuracy")
            ax.set_ylabel("global test accuracy")
            ax.grid(alpha=0.3)
        axes[-1].legend(bbox_to_anchor=(1.02, 1.0), loc="upper left", fontsize="small")
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out_dir / f"panel_{dataset}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    runs_dir = run_dir(args.out_dir)
    jobs = jobs_of(args)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    if not args.skip_run:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
            runs = list(pool.map(lambda j: run_job(j, runs_dir, args), jobs))
    wall = time.monotonic() - started
    analysis: dict[str, dict[str, Any]] = {}
    cells = []
    for dataset in args.datasets:
        for setting in DATASET_SETTINGS[dataset]:
            chosen = [j for j in jobs if j["dataset"] == dataset and j["setting"] == setting]
            results = [r for r in (load_job(runs_dir, j) for j in chosen) if r is not None]
            if not results:
                continue
            table = aggregate(results)
            analysis.setdefault(dataset, {})[setting] = {
                "seeds": len(results),
                "methods": table,
                "bars": bars(table),
                "pareto_front": front(table),
                "convergence": convergence(results),
                "gate_headroom": {
                    m: headroom(table, m) for m in table if m not in (ORACLE, FEDAVG)
                },
            }
            cells += [
                {
                    "dataset": dataset,
                    "setting": setting,
                    "seed": r["config"]["seed"],
                    "config": r["config"],
                    "wall_time_s": r.get("wall_time_s", {}),
                }
                for r in results
            ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(analysis, args.out_dir)
    md = markdown(analysis)
    (args.out_dir / f"{NAME}.md").write_text(md)
    write_result(
        args.out_dir,
        NAME,
        {
            "config": {
                "datasets": args.datasets,
                "seeds": args.seeds,
                "settings": SETTINGS,
                "dataset_settings": DATASET_SETTINGS,
                "parallel": args.parallel,
                "job_timeout_s": args.job_timeout,
                "overrides": args.overrides,
                "tiny": args.tiny,
            },
            "wall_s": round(wall, 1),
            "jobs": runs,
            "analysis": analysis,
            "cells": cells,
            "plots": [p.name for p in plots],
            "notes": [
                "headroom closed = (method - fedavg) / (oracle_router - fedavg) on the global "
                "test, reported where oracle_router - fedavg >= 2 points.",
                "pareto_front: methods whose (local, global) mean no other method matches or "
                f"beats on both, one strictly; references ({', '.join(REFERENCES)}) left out.",
                bars_note(),
                *args.note,
            ],
        },
        started_machine,
    )
    print(md)


if __name__ == "__main__":
    main()
