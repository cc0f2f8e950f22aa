"""Per-wave latency in the deployment runtime: flwr's stock executor against the warm executor.

    python bench/waves.py                  # 3 SuperNodes, 2 repeats of each executor
    python bench/waves.py --tiny           # 2 SuperNodes, 1 repeat, 1 stage-1 round

A wave is one message to every SuperNode and its replies. One run starts the same loopback
federation (scripts/local_deployment.Deployment: a SuperLink and N SuperNodes, insecure)
once per executor and repeat, alternating which executor goes first: `stock` (SuperNodes in
`--isolation subprocess`: their SuperExec starts a fresh `flwr-clientapp` process per message)
and `warm` (SuperNodes in `--isolation process`, each with a `client_app.warm_executor` that
forks a child per message from a process that already imported flwr, torch and the app). On
each it runs the same two jobs: training (`experiment=smoke gate=rangate fe.rounds=R
fe.local_epochs=1 expert.epochs=1 partition=iid baselines=[] state_key=...`) and then
inference only on the state the training saved (`mode=inference`).

Per-wave latency is measured by the ServerApp (results.json): `wall_time_s` of a stage divided
by the waves it sends: fe_ce one per round, evaluate_local one (`evaluate`), inference three
per gate (route, expert, combine; `inference_latency`). Discovery (`query.info`, the first
message of a run, where each node also builds its data cache) is outside every stage and not
counted; the run's wall time (submit to finished) is recorded beside. Results of the two
executors must be the same (same seeds, same data; metrics the server averages over replies in
arrival order to 1e-6).

Writes bench/results/waves.json: per executor the per-wave latency (total seconds of the
counted stages / their waves, and per stage), the run wall times and the load average around
each federation; the warm / stock ratio. Bar: warm <= 1/3 of stock. The federations' folders
go to outputs/bench/waves/ (git-ignored; never inside bench/results/, whose json files
`flwr run .` would pack into the app bundle).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import base_parser, machine_info, median, write_result

sys.path.insert(0, str(benchlib.REPO_ROOT))  # scripts/ is not an installed package
from scripts.local_deployment import COMPLETED_STATUS, STOCK, WARM, Deployment

NAME = "waves"
BAR_RATIO = 1 / 3
DEFAULTS = {"nodes": 3, "fe_rounds": 5, "repeats": 2}
TINY = {"nodes": 2, "fe_rounds": 1, "repeats": 1}
STATE_KEY = "bench-waves"
JOB = "experiment=smoke gate=rangate fe.local_epochs=1 expert.epochs=1 partition=iid baselines=[]"
RUN_TIMEOUT_S = 1800.0
INFERENCE_WAVES = 3  # query.route, query.expert, query.combine
COMPARED_KEYS = ("accuracy", "accuracy_global", "history", "routing_counts", "predictions")
FLOAT_REL_TOL = 1e-6
RUN_ROOT = benchlib.REPO_ROOT / "outputs" / "bench" / NAME


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=DEFAULTS["nodes"])
    parser.add_argument(
        "--fe-rounds", type=int, default=DEFAULTS["fe_rounds"], help="stage-1 rounds (waves)"
    )
    parser.add_argument(
        "--repeats", type=int, default=DEFAULTS["repeats"], help="federations per executor"
    )
    parser.add_argument(
        "--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds to wait for each run"
    )
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def stage_waves(results: dict[str, Any], fe_rounds: int) -> dict[str, tuple[float, int]]:
    """(seconds, waves) of every stage whose number of waves the config fixes."""
    wall = results.get("wall_time_s", {})
    out: dict[str, tuple[float, int]] = {}
    if "fe_ce" in wall:
        out["fe_ce"] = (float(wall["fe_ce"]), fe_rounds)
    if "evaluate_local" in wall:
        out["evaluate_local"] = (float(wall["evaluate_local"]), 1)
    for gate, entry in results.get("inference_latency", {}).items():
        out[f"inference.{gate}"] = (float(entry["seconds"]), INFERENCE_WAVES)
    return out


def run_job(deployment: Deployment, overrides: str, out: Path, timeout: float) -> dict[str, Any]:
    """One `flwr run` to completion: its status, wall time and results.json."""
    started = time.monotonic()
    status, run_id = deployment.run(f"{overrides} output_dir={out}", timeout)
    wall = time.monotonic() - started
    if status != COMPLETED_STATUS:
        raise RuntimeError(
            f"run {run_id} ({overrides}): {status}\n{deployment.logs(run_id)[-3000:]}"
        )
    return {
        "run_id": run_id,
        "wall_s": round(wall, 2),
        "results": json.loads((out / "results.json").read_text()),
    }


def federation(kind: str, repeat: int, args: Any, root: Path) -> dict[str, Any]:
    """Start the federation with `kind` executors, run both jobs, stop it; what it measured."""
    workdir = root / f"{kind}-{repeat}"
    shutil.rmtree(workdir, ignore_errors=True)
    load_before = list(os.getloadavg())
    started = time.monotonic()
    with Deployment(workdir, args.nodes, executor=kind) as deployment:
        startup = time.monotonic() - started
        print(f"[waves] {kind} #{repeat}: {args.nodes} nodes up in {startup:.1f}s", flush=True)
        train = run_job(
            deployment,
            f"{JOB} fe.rounds={args.fe_rounds} state_key={STATE_KEY} record_predictions=true",
            workdir / "out-train",
            args.timeout,
        )
        infer = run_job(
            deployment,
            f"{JOB} fe.rounds={args.fe_rounds} state_key={STATE_KEY} mode=inference "
            "record_predictions=true",
            workdir / "out-infer",
            args.timeout,
        )
    jobs = {"train": train, "inference_only": infer}
    stages = {
        f"{job}:{stage}": {"seconds": s, "waves": w, "per_wave_s": round(s / w, 3)}
        for job, entry in jobs.items()
        for stage, (s, w) in stage_waves(entry["results"], args.fe_rounds).items()
    }
    seconds = sum(v["seconds"] for v in stages.values())
    waves = sum(v["waves"] for v in stages.values())
    entry = {
        "executor": kind,
        "repeat": repeat,
        "startup_s": round(startup, 2),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "run_wall_s": {job: e["wall_s"] for job, e in jobs.items()},
        "stages": stages,
        "counted_waves": waves,
        "per_wave_s": round(seconds / waves, 3),
        "results": {job: e["results"] for job, e in jobs.items()},
    }
    print(
        f"[waves] {kind} #{repeat}: {entry['per_wave_s']:.2f}s per wave over {waves} waves; "
        f"runs {entry['run_wall_s']}; load {entry['load_average_after']}",
        flush=True,
    )
    return entry


def same_numbers(a: Any, b: Any, rel: float = FLOAT_REL_TOL) -> bool:
    """Equal documents, floats to a relative tolerance (the server averages the replies'
    metrics in arrival order, so their last digits vary between any two runs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (abs(a - b) <= rel * max(abs(a), abs(b)))
        )
    return a == b


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """COMPARED_KEYS on which two results.json differ (see `same_numbers`)."""
    return [key for key in COMPARED_KEYS if not same_numbers(a.get(key), b.get(key))]


def summarize(entries: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    mine = [e for e in entries if e["executor"] == kind]
    seconds = sum(v["seconds"] for e in mine for v in e["stages"].values())
    waves = sum(e["counted_waves"] for e in mine)
    per_stage: dict[str, list[float]] = {}
    for e in mine:
        for name, v in e["stages"].items():
            per_stage.setdefault(name, []).append(v["per_wave_s"])
    return {
        "per_wave_s": round(seconds / waves, 3),
        "per_wave_s_by_federation": [e["per_wave_s"] for e in mine],
        "per_wave_s_median_by_stage": {k: round(median(v), 3) for k, v in per_stage.items()},
        "counted_waves": waves,
        "run_wall_s": {
            job: [e["run_wall_s"][job] for e in mine] for job in ("train", "inference_only")
        },
        "load_average_1min": [
            [e["load_average_before"][0], e["load_average_after"][0]] for e in mine
        ],
    }


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    root = (
        RUN_ROOT
        if args.out_dir.resolve().is_relative_to(benchlib.REPO_ROOT)
        else args.out_dir / "runs" / NAME
    )
    entries: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        order = (STOCK, WARM) if repeat % 2 == 0 else (WARM, STOCK)
        for kind in order:
            entries.append(federation(kind, repeat, args, root))
    stock, warm = summarize(entries, STOCK), summarize(entries, WARM)
    ratio = warm["per_wave_s"] / stock["per_wave_s"]
    reference = entries[0]["results"]
    identical = {
        f"{e['executor']}#{e['repeat']}:{job}": differing_keys(reference[job], e["results"][job])
        for e in entries[1:]
        for job in ("train", "inference_only")
    }
    result = {
        "config": {
            "nodes": args.nodes,
            "fe_rounds": args.fe_rounds,
            "repeats": args.repeats,
            "job": JOB,
            "tiny": args.tiny,
            "run_root": str(root),
        },
        "stock": stock,
        "warm": warm,
        "ratio_warm_over_stock": round(ratio, 3),
        "bar": {"max_ratio": round(BAR_RATIO, 4), "bar_met": ratio <= BAR_RATIO},
        "results_identical_to_first": {k: not v for k, v in identical.items()},
        "differing_keys": {k: v for k, v in identical.items() if v},
        "federations": [{k: v for k, v in e.items() if k != "results"} for e in entries],
        "notes": [
            "per_wave_s: total seconds of the counted stages / their waves (fe_ce: fe.rounds, "
            "evaluate_local: 1, inference: 3 per gate), server-side from results.json; both jobs "
            "(training, then inference only on its saved state) of every federation of that "
            "executor.",
            "A SuperNode pulls its next message 3 s after its last empty pull (fixed in flwr "
            "1.42) and checks for the reply every 0.5 s: about 3 s of every wave whatever runs "
            "the ClientApp.",
            "The warm executor's first task of a FAB (query.info of the training job, outside "
            "the counted stages) also compares the installed FAB with the preloaded app.",
            "The machine is shared: see load_average_1min (before, after each federation).",
            "Results are compared with the first federation's: accuracies, routing counts and "
            "predictions exactly, history metrics to 1e-6 relative (averaged over the replies "
            "in arrival order, their last digits differ between any two runs, stock or warm).",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    print(
        f"[waves] stock {stock['per_wave_s']:.2f}s, warm {warm['per_wave_s']:.2f}s per wave: "
        f"ratio {ratio:.3f} (bar <= {BAR_RATIO:.3f}: {result['bar']['bar_met']}); "
        f"identical results: {all(not v for v in identical.values())}\n{path}",
        flush=True,
    )


if __name__ == "__main__":
    main()
