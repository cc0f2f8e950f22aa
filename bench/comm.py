"""Communication: bytes up and down per stage and per method, against full-model FedAvg.

    python bench/comm.py                    # the benchmark panel's jobs (run bench/panel.py first)
    python bench/comm.py --runs-dir DIR     # every results.json under DIR (any nmoe run or sweep)

Reads the jobs the benchmark panel ran (bench/panel.py: every method on every setting; their
results.json under `<out-dir>/runs/panel/`), so the bytes are those of the runs whose accuracy
the panel reports. For every job: the ledger's bytes per stage (payload arrays plus serialised
configs and metrics, counted on every message), each method's training traffic (the stages it
needs), and what full-model FedAvg (F + linear head, float32, sizes from nmoe.models for the
job's dataset in the registry) would move in the same number of rounds. Bar: FedGate's stage-3
upload per round <= 5% of a full-model FedAvg upload per round (all clients). Also: the analytic
payload of one client's round (shared gate keys, F + head, what stage 1 actually ships) and the
same ratio for the paper's CIFAR-10 ResNet setup with the jobs' gate schedule.
Writes bench/results/comm.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import benchlib
from benchlib import base_parser, machine_info, write_result
from panel import run_dir as panel_run_dir

NAME = "comm"
BAR_GATE = "fedgate"  # the gate whose upload the bar is about (partial synchronisation)
BAR_GATE_UPLOAD_FRACTION = 0.05
LABEL_BYTES = 8  # int64 label per raw sample (centralized: the data would have to be uploaded)
CIFAR_PRESET = "experiment=paper_cifar10_noniid"
# The history stage that counts a ledger stage's rounds where the names differ: the ledger's
# "expert" stage holds the shared expert H_0's FedAvg rounds (server_app/stages/experts.py).
ROUNDS_IN_HISTORY = {"expert": "shared_expert"}


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="read every results.json under this folder (default: the panel's run folder, "
        "<out-dir>/runs/panel)",
    )
    args = parser.parse_args()
    if args.runs_dir is None:
        args.runs_dir = panel_run_dir(args.out_dir)
    return args


# ---------------------------------------------------------------------------- model sizes
def param_bytes(module: Any) -> int:
    return sum(p.numel() for p in module.state_dict().values()) * benchlib.BYTES_PER_FLOAT32


def model_sizes(config: dict[str, Any], num_clients: int) -> dict[str, int]:
    """float32 bytes of F, head, projector, expert, gate trunk/head for a job's config."""
    from omegaconf import OmegaConf

    from nmoe.datasets import dataset_info
    from nmoe.models import STAGE1_PARTS, build_bundle, build_expert, build_gate

    model = OmegaConf.create(config["model"])
    info = dataset_info(config["dataset"]["name"])
    shape, classes = info.image_shape, info.num_classes
    bundle = build_bundle(model, shape, classes, 0)
    num_experts = num_clients + (1 if config["expert"]["shared_expert"] else 0)
    gate = build_gate(model, num_experts, 0)
    return {
        "extractor": param_bytes(bundle.fe),
        "head": param_bytes(bundle.head),
        "projector": param_bytes(bundle.projector),
        "full_model_f_plus_head": param_bytes(bundle.fe) + param_bytes(bundle.head),
        "stage1_bundle_as_shipped": sum(
            param_bytes(getattr(bundle, part)) for part in STAGE1_PARTS[config["fe"]["method"]]
        ),
        "expert": param_bytes(build_expert(model, classes, 0)),
        "gate_trunk": param_bytes(gate.trunk),
        "gate_head": param_bytes(gate.head),
        "raw_sample": int(math.prod(shape)) * benchlib.BYTES_PER_FLOAT32 + LABEL_BYTES,
        "num_experts": num_experts,
    }


def shared_gate_bytes(config: dict[str, Any], sizes: dict[str, int]) -> float:
    """Gate bytes one client uploads per FedGate round, averaged over the configured rounds
    (the keys the gate's module declares shared in each round)."""
    from omegaconf import OmegaConf

    from nmoe import gates

    cfg = OmegaConf.create(config)
    gate = gates.get(BAR_GATE)
    params = gate.initial_params(cfg.model, sizes["num_experts"], 0)
    rounds = range(1, int(cfg.gate.rounds) + 1)
    synced = sum(
        params[k].nbytes for rnd in rounds for k in gate.shared_keys(cfg.gate, rnd, sorted(params))
    )
    return synced / len(rounds)


# ---------------------------------------------------------------------------- per job
def method_stages(config: dict[str, Any]) -> dict[str, list[str]]:
    """The ledger stages whose traffic each method's training needs (gates from the registry)."""
    from nmoe import gates
    from nmoe.config import FEDAVG_MODEL_BASELINES
    from server_app.app import STAGE1_NAMES

    fe = STAGE1_NAMES[config["fe"]["method"]]
    personal = [fe, "expert"]
    stages = {
        "local_expert": personal,
        "shared_fe_own_head": [fe, "baseline_own_head"],
        **{
            m: [fe] if config["fe"]["method"] == "fedce" else ["baseline_fedavg"]
            for m in FEDAVG_MODEL_BASELINES
        },
        "local_only": ["baseline_local_only"],
        "centralized": [],  # moves no model; see raw_training_data_upload_bytes
        "oracle_router": personal,
    }
    for name, gate in gates.GATES.items():
        stages[name] = personal + (["gate_cache", name] if gate.trainable else [])
    stages["nmoe"] = stages[config["gate"]["method"]]
    return stages


def federated_rounds(results: dict[str, Any], stage: str) -> int:
    """Rounds a ledger stage ran, counted as full FedAvg rounds, from the job's history (as run:
    a patience rule may stop early; RollGate: one pass over every client is one round; stages
    with no rounds in the history, 0)."""
    name = ROUNDS_IN_HISTORY.get(stage, stage)
    return len({row["round"] for row in results["history"] if row["stage"] == name})


def analyse_job(path: Path) -> dict[str, Any]:
    """Bytes per stage and method of one results.json, and the FedGate bar."""
    from nmoe.results import load_results
    from server_app.app import STAGE1_NAMES

    results = load_results(path)
    config, ledger = results["config"], results["comm_bytes"]
    n = int(results["nodes"]["num_partitions"])
    sizes = model_sizes(config, n)
    full_round = n * sizes["full_model_f_plus_head"]  # one full-model FedAvg round, one direction
    zero = {"up": 0, "down": 0}
    methods = {}
    for method, stages in method_stages(config).items():
        if method not in results["accuracy"]:
            continue
        up = sum(ledger.get(s, zero)["up"] for s in stages)
        down = sum(ledger.get(s, zero)["down"] for s in stages)
        rounds = sum(federated_rounds(results, s) for s in stages)
        entry = {
            "stages": stages,
            "up": up,
            "down": down,
            "rounds": rounds,
            "full_model_fedavg_up": rounds * full_round,
            "full_model_fedavg_down": rounds * full_round,
            "up_over_full_model": up / (rounds * full_round) if rounds else None,
        }
        if method == "centralized":
            train = sum(int(info["num_train"]) for info in results["nodes"]["info"].values())
            entry["raw_training_data_upload_bytes"] = train * sizes["raw_sample"]
        methods[method] = entry
    bar: dict[str, Any] = {"measured": BAR_GATE in ledger}
    if bar["measured"]:
        gate_rounds = federated_rounds(results, BAR_GATE)
        per_round = ledger[BAR_GATE]["up"] / gate_rounds
        analytic = shared_gate_bytes(config, sizes)
        bar.update(
            {
                "rounds": gate_rounds,
                f"{BAR_GATE}_upload_per_round": per_round,
                "full_model_fedavg_upload_per_round": full_round,
                "fraction": per_round / full_round,
                "limit": BAR_GATE_UPLOAD_FRACTION,
                "met": per_round / full_round <= BAR_GATE_UPLOAD_FRACTION,
                "analytic_shared_gate_upload_per_round": n * analytic,
                "analytic_fraction": analytic / sizes["full_model_f_plus_head"],
            }
        )
    fe_stage = STAGE1_NAMES[config["fe"]["method"]]
    fe_rounds = federated_rounds(results, fe_stage)
    return {
        "results": str(path),
        "dataset": config["dataset"]["name"],
        "fe": config["fe"]["method"],
        "gate": config["gate"]["method"],
        "partition": config["partition"]["kind"],
        "alpha": config["partition"].get("alpha"),
        "topology": config["topology"]["kind"],
        "seed": config["seed"],
        "num_clients": n,
        "model_bytes": sizes,
        "stages": ledger,
        "per_round_per_client": {
            "stage1_upload_measured": ledger[fe_stage]["up"] / (fe_rounds * n)
            if fe_stage in ledger and fe_rounds
            else None,
            "stage1_bundle_as_shipped": sizes["stage1_bundle_as_shipped"],
            "full_model_f_plus_head": sizes["full_model_f_plus_head"],
            f"{BAR_GATE}_shared_keys": shared_gate_bytes(config, sizes),
        },
        "methods": methods,
        f"{BAR_GATE}_bar": bar,
    }


def cifar_reference(job_config: dict[str, Any]) -> dict[str, Any]:
    """Gate-vs-full-model ratio for the paper's CIFAR-10 ResNet setup (sizes only, no data),
    with a job's gate schedule and expert layout, at the preset's number of clients."""
    from nmoe.config import compose_config, to_dict

    config = to_dict(compose_config([CIFAR_PRESET]))
    config["gate"] = job_config["gate"]
    config["expert"]["shared_expert"] = job_config["expert"]["shared_expert"]
    num_clients = int(config["simulation"]["num_clients"])
    sizes = model_sizes(config, num_clients)
    gate = shared_gate_bytes(config, sizes)
    return {
        "preset": CIFAR_PRESET,
        "gate_config_and_shared_expert_of": "the first job read",
        "num_clients": num_clients,
        "model_bytes": sizes,
        f"{BAR_GATE}_shared_keys": gate,
        "fraction": gate / sizes["full_model_f_plus_head"],
    }


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    from nmoe.results import load_results

    runs_dir = args.runs_dir.resolve()
    paths = sorted(runs_dir.rglob("results.json"))
    completed = [p for p in paths if load_results(p).get("status") == "completed"]
    if not completed:
        raise SystemExit(
            f"no completed results.json under {runs_dir}: run bench/panel.py first "
            "(same --out-dir), or pass --runs-dir"
        )
    jobs = [analyse_job(p) for p in completed]
    bar_key = f"{BAR_GATE}_bar"
    measured = [j[bar_key] for j in jobs if j[bar_key]["measured"]]
    result = {
        "config": {
            "runs_dir": str(runs_dir),
            "skipped_not_completed": [str(p) for p in paths if p not in completed],
        },
        "jobs": jobs,
        "summary": {
            "jobs": len(jobs),
            f"{bar_key}_jobs": len(measured),
            f"{bar_key}_met_in_all": bool(measured) and all(b["met"] for b in measured),
            f"{BAR_GATE}_fraction_max": max((b["fraction"] for b in measured), default=None),
            f"{BAR_GATE}_fraction_min": min((b["fraction"] for b in measured), default=None),
            "limit": BAR_GATE_UPLOAD_FRACTION,
        },
        "cifar10_resnet_reference": cifar_reference(load_results(completed[0])["config"]),
        "notes": [
            "Ledger bytes = array payload (with keys) + serialised ConfigRecords and "
            "MetricRecords, counted on every message; peer payloads are sealed (a few bytes of "
            "overhead per batch).",
            "full-model FedAvg = F + linear head in float32, n clients, the same number of "
            "rounds (as run: a patience rule may stop a stage early), each direction.",
            "stage 'expert' includes the shared expert H_0's FedAvg rounds when "
            "expert.shared_expert is set.",
            "centralized moves no model: its cost is uploading the raw training data "
            "(raw_training_data_upload_bytes).",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    for job in jobs:
        bar = job[bar_key]
        if bar["measured"]:
            print(
                f"[comm] {job['results']}: {BAR_GATE} upload/round "
                f"{bar[f'{BAR_GATE}_upload_per_round']:.0f} B = {100 * bar['fraction']:.1f}% of "
                f"full-model FedAvg {bar['full_model_fedavg_upload_per_round']} B (bar <= "
                f"{100 * BAR_GATE_UPLOAD_FRACTION:.0f}%: {'met' if bar['met'] else 'MISSED'})",
                flush=True,
            )
    print(path)


if __name__ == "__main__":
    main()
