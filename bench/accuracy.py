"""Accuracy of every method: local vs global test accuracy over Dirichlet alphas and seeds.

    python bench/accuracy.py                                       # digits, 10 clients, alpha 0.3/0.1, seeds 0-2
    python bench/accuracy.py --nmoe-config "gate=fedgate gate.k=3" # another NMoE configuration
    python bench/accuracy.py --skip-run                            # re-analyse the existing sweep

Runs the `nmoe` CLI once as a Hydra multirun over fe x alpha x seed with every baseline
(`fe=fedce,fedsc`: the first fe method is the main one, the others are compared against it),
then aggregates each method's (local, global) accuracy pair per alpha (mean and sample std
over seeds), draws a local-vs-global scatter with error bars (bench/results/accuracy.png),
computes the Pareto front of all methods except `centralized`, and reports for `nmoe`: on the
front or not, gap to the best personal baseline on local accuracy, global accuracy against
`fedavg` and `shared_fe_own_head`, gap to `centralized`. Writes bench/results/accuracy.json.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import benchlib
from benchlib import (
    ALL_BASELINES,
    DEFAULT_NMOE_CONFIG,
    base_parser,
    machine_info,
    mean_std,
    run_monitored,
    split_overrides,
    write_result,
)

NAME = "accuracy"
SWEPT_KEYS = ("fe", "partition.alpha", "seed", "simulation.num_clients", "baselines")
PERSONAL_BASELINES = ("local_expert", "shared_fe_own_head", "local_only")
GLOBAL_BASELINES = ("fedavg", "shared_fe_own_head")
REFERENCE = "centralized"
NMOE = "nmoe"
DEFAULTS = {
    "alphas": ["0.3", "0.1"],
    "seeds": ["0", "1", "2"],
    "num_clients": 10,
    "fe_methods": ["fedce", "fedsc"],
}
TINY = {"alphas": ["0.3"], "seeds": ["0"], "num_clients": 3}
TINY_OVERRIDES = [
    "fe.rounds=1",
    "fe.local_epochs=1",
    "fe.probe_epochs=1",
    "expert.epochs=1",
    "expert.shared_rounds=1",
    "gate.rounds=1",
    "gate.local_epochs=1",
]
FIGSIZE_PER_PANEL = (8.0, 5.5)  # wide enough for the legend right of each panel
LEGEND_OUTSIDE = (1.02, 1.0)
DPI = 120
CAPSIZE = 3


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", nargs="+", default=DEFAULTS["alphas"], help="Dirichlet alphas")
    parser.add_argument("--seeds", nargs="+", default=DEFAULTS["seeds"])
    parser.add_argument("--num-clients", type=int, default=DEFAULTS["num_clients"])
    parser.add_argument(
        "--fe-methods",
        nargs="+",
        default=DEFAULTS["fe_methods"],
        help="stage-1 methods; the first is the main one (Pareto front, NMoE report)",
    )
    parser.add_argument(
        "--nmoe-config", default=DEFAULT_NMOE_CONFIG, help="Hydra overrides of the NMoE under test"
    )
    parser.add_argument(
        "--overrides", default="", help="further Hydra overrides for every job (not the swept keys)"
    )
    parser.add_argument(
        "--skip-run", action="store_true", help="only analyse the sweep folder of an earlier run"
    )
    args = parser.parse_args()
    if args.tiny:
        args.alphas, args.seeds, args.num_clients = (
            TINY["alphas"],
            TINY["seeds"],
            TINY["num_clients"],
        )
    return args


def sweep_command(args: Any, sweep_dir: Path) -> list[str]:
    """The `nmoe -m` command of the whole sweep; refuses overrides of the swept keys."""
    fixed = split_overrides(args.nmoe_config) + split_overrides(args.overrides)
    clash = [o for o in fixed if o.split("=", 1)[0].lstrip("+~") in SWEPT_KEYS]
    if clash:
        raise SystemExit(
            f"accuracy.py sweeps {', '.join(SWEPT_KEYS)} itself; remove {clash} "
            "(use --fe-methods, --alphas, --seeds, --num-clients)"
        )
    return [
        str(benchlib.NMOE_CLI),
        "-m",
        f"fe={','.join(args.fe_methods)}",
        f"partition.alpha={','.join(args.alphas)}",
        f"seed={','.join(args.seeds)}",
        f"simulation.num_clients={args.num_clients}",
        f"baselines=[{','.join(ALL_BASELINES)}]",
        *fixed,
        "log_level=quiet",
        *(TINY_OVERRIDES if args.tiny else []),
        f"hydra.sweep.dir={sweep_dir}",
    ]


# ---------------------------------------------------------------------------- aggregation
def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """(fe, alpha, seed, gate, per-method local/global mean accuracy) of every job in the sweep."""
    from nmoe.results import load_results

    jobs = []
    for path in sorted(sweep_dir.rglob("results.json")):
        results = load_results(path)
        if results.get("status") != "completed":
            raise RuntimeError(f"{path}: status {results.get('status')} ({results.get('error')})")
        config = results["config"]
        jobs.append(
            {
                "path": str(path),
                "fe": config["fe"]["method"],
                "alpha": float(config["partition"]["alpha"]),
                "seed": int(config["seed"]),
                "gate": config["gate"]["method"],
                "methods": {
                    m: (
                        float(results["accuracy"][m]["mean"]),
                        float(results["accuracy_global"][m]["mean"]),
                    )
                    for m in results["accuracy"]
                },
            }
        )
    if not jobs:
        raise RuntimeError(f"no results.json under {sweep_dir}")
    return jobs


def aggregate(jobs: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, dict[str, Any]]]]:
    """fe -> alpha -> method -> mean/std over seeds of local and global accuracy, per-seed values."""
    grouped: dict[tuple[str, float, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    for job in jobs:
        for method, pair in job["methods"].items():
            grouped[(job["fe"], job["alpha"], method)][job["seed"]] = pair
    out: dict[str, dict[float, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for (fe, alpha, method), by_seed in sorted(grouped.items()):
        seeds = sorted(by_seed)
        local_mean, local_std = mean_std([by_seed[s][0] for s in seeds])
        global_mean, global_std = mean_std([by_seed[s][1] for s in seeds])
        out[fe][alpha][method] = {
            "local_mean": local_mean,
            "local_std": local_std,
            "global_mean": global_mean,
            "global_std": global_std,
            "n_seeds": len(seeds),
            "seeds": seeds,
            "per_seed": {str(s): list(by_seed[s]) for s in seeds},
        }
    return out


def drop_nmoe_alias(methods: dict[str, dict[str, Any]], gate: str) -> str | None:
    """The configured gate is reported twice (as itself and as `nmoe`, same numbers): keep `nmoe`."""
    if (
        gate in methods
        and NMOE in methods
        and methods[gate]["per_seed"] == methods[NMOE]["per_seed"]
    ):
        del methods[gate]
        return gate
    return None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (local, global) no other point matches or beats on both axes, beating on one."""

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points.values())

    return sorted(
        (name for name, p in points.items() if not dominated(p)), key=lambda n: -points[n][0]
    )


def paired_wins(a: dict[str, Any], b: dict[str, Any], axis: int) -> str:
    """Seeds where method a beats method b on one axis (0 local, 1 global), as 'k/n'."""
    seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]))
    return f"{sum(a['per_seed'][s][axis] > b['per_seed'][s][axis] for s in seeds)}/{len(seeds)}"


def nmoe_report(methods: dict[str, dict[str, Any]], front: list[str]) -> dict[str, Any]:
    """Where `nmoe` stands against the front, the personal baselines, the global baselines, centralized."""
    if NMOE not in methods:
        return {"error": "no nmoe result"}
    me = methods[NMOE]
    report: dict[str, Any] = {
        "local_mean": me["local_mean"],
        "global_mean": me["global_mean"],
        "on_pareto_front": NMOE in front,
    }
    personal = {m: methods[m]["local_mean"] for m in PERSONAL_BASELINES if m in methods}
    if personal:
        best = max(personal, key=lambda m: personal[m])
        report["best_personal_baseline"] = best
        report["local_gap_to_best_personal"] = me["local_mean"] - personal[best]
        report["local_wins_vs_best_personal_seeds"] = paired_wins(me, methods[best], 0)
    for baseline in GLOBAL_BASELINES:
        if baseline in methods:
            diff = me["global_mean"] - methods[baseline]["global_mean"]
            report[f"global_minus_{baseline}"] = diff
            report[f"global_greater_than_{baseline}"] = diff > 0
            report[f"global_wins_vs_{baseline}_seeds"] = paired_wins(me, methods[baseline], 1)
    if REFERENCE in methods:
        report["local_gap_to_centralized"] = me["local_mean"] - methods[REFERENCE]["local_mean"]
        report["global_gap_to_centralized"] = me["global_mean"] - methods[REFERENCE]["global_mean"]
    return report


def fe_comparison(
    table: dict[str, dict[float, dict[str, dict[str, Any]]]], main_fe: str
) -> dict[str, Any]:
    """Per other fe method and alpha: each method's (local, global) mean minus the main fe's."""
    out: dict[str, Any] = {}
    for fe, by_alpha in table.items():
        if fe == main_fe:
            continue
        for alpha, methods in by_alpha.items():
            base = table.get(main_fe, {}).get(alpha, {})
            out.setdefault(fe, {})[str(alpha)] = {
                m: {
                    "local_mean": v["local_mean"],
                    "global_mean": v["global_mean"],
                    f"local_minus_{main_fe}": v["local_mean"] - base[m]["local_mean"]
                    if m in base
                    else None,
                    f"global_minus_{main_fe}": v["global_mean"] - base[m]["global_mean"]
                    if m in base
                    else None,
                }
                for m, v in methods.items()
            }
    return out


# ---------------------------------------------------------------------------- plot
def plot(
    table: dict[str, dict[float, dict[str, dict[str, Any]]]],
    main_fe: str,
    fronts: dict[float, list[str]],
    path: Path,
) -> Path:
    """One panel per alpha: every method of the main fe with error bars, the front, other fe's nmoe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    alphas = sorted(table[main_fe], reverse=True)
    fig = Figure(figsize=(FIGSIZE_PER_PANEL[0] * len(alphas), FIGSIZE_PER_PANEL[1]))
    FigureCanvasAgg(fig)
    for i, alpha in enumerate(alphas):
        ax = fig.add_subplot(1, len(alphas), i + 1)
        methods = table[main_fe][alpha]
        for name, v in methods.items():
            marker = "*" if name == REFERENCE else ("D" if name == NMOE else "o")
            ax.errorbar(
                v["local_mean"],
                v["global_mean"],
                xerr=_err(v["local_std"]),
                yerr=_err(v["global_std"]),
                fmt=marker,
                capsize=CAPSIZE,
                label=name,
                markersize=10 if name in (NMOE, REFERENCE) else 6,
            )
        for fe, by_alpha in table.items():
            if fe != main_fe and NMOE in by_alpha.get(alpha, {}):
                v = by_alpha[alpha][NMOE]
                ax.errorbar(
                    v["local_mean"],
                    v["global_mean"],
                    xerr=_err(v["local_std"]),
                    yerr=_err(v["global_std"]),
                    fmt="D",
                    mfc="none",
                    capsize=CAPSIZE,
                    markersize=10,
                    label=f"nmoe (fe={fe})",
                )
        front = sorted(fronts[alpha], key=lambda m: methods[m]["local_mean"])
        ax.plot(
            [methods[m]["local_mean"] for m in front],
            [methods[m]["global_mean"] for m in front],
            "k--",
            linewidth=1,
            label="Pareto front (w/o centralized)",
        )
        ax.set_title(f"Dirichlet alpha={alpha}, fe={main_fe} (mean ± std over seeds)")
        ax.set_xlabel("local test accuracy")
        ax.set_ylabel("global test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=LEGEND_OUTSIDE)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _err(std: float) -> float | None:
    return None if math.isnan(std) else std


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    sweep_dir = (args.out_dir / "sweeps" / NAME).resolve()
    command = sweep_command(args, sweep_dir)
    runs = []
    if not args.skip_run:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        runs.append(
            run_monitored(command, sweep_dir.parent / f"{NAME}.log", benchlib.REPO_ROOT).as_dict()
        )
    jobs = load_jobs(sweep_dir)
    table = aggregate(jobs)
    main_fe = args.fe_methods[0]
    if main_fe not in table:
        raise RuntimeError(f"no job with fe={main_fe} in {sweep_dir}")
    nmoe_gate = jobs[0]["gate"]
    aliases = {
        fe: {str(a): drop_nmoe_alias(m, nmoe_gate) for a, m in by_alpha.items()}
        for fe, by_alpha in table.items()
    }
    fronts, reports = {}, {}
    for alpha, methods in table[main_fe].items():
        points = {
            m: (v["local_mean"], v["global_mean"]) for m, v in methods.items() if m != REFERENCE
        }
        fronts[alpha] = pareto_front(points)
        reports[str(alpha)] = nmoe_report(methods, fronts[alpha])
    png = plot(table, main_fe, fronts, args.out_dir / f"{NAME}.png")
    result = {
        "config": {
            "nmoe_config": args.nmoe_config,
            "overrides": args.overrides,
            "fe_methods": args.fe_methods,
            "main_fe": main_fe,
            "alphas": args.alphas,
            "seeds": args.seeds,
            "num_clients": args.num_clients,
            "sweep_command": " ".join(command),
            "sweep_dir": str(sweep_dir),
            "nmoe_gate": nmoe_gate,
            "dropped_aliases_of_nmoe": aliases,
        },
        "runs": runs,
        "jobs": len(jobs),
        "table": {fe: {str(a): m for a, m in by_alpha.items()} for fe, by_alpha in table.items()},
        "pareto_front": {str(a): f for a, f in fronts.items()},
        "nmoe": reports,
        "fe_comparison": fe_comparison(table, main_fe),
        "plot": str(png),
        "notes": [
            "std is the sample standard deviation over seeds (null with one seed).",
            "The Pareto front is over the main fe's methods except centralized, on mean accuracies.",
            "*_wins_*_seeds: seeds (paired) on which nmoe beats the baseline on that axis.",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    for alpha, report in reports.items():
        print(f"[accuracy] alpha={alpha}: {report}", flush=True)
    print(path)


if __name__ == "__main__":
    main()
