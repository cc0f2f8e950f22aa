"""Communication: bytes up and down per stage and per method, against full-model FedAvg.

    python bench/comm.py                                            # runs one job (10 clients, all methods)
    python bench/comm.py --sweep-dir bench/results/sweeps/accuracy  # reads the accuracy sweep's jobs instead

For every job (results.json): the ledger's bytes per stage (payload arrays plus serialised
configs and metrics, counted on every message), each method's training traffic (the stages
it needs), and what full-model FedAvg (F + linear head, float32, sizes from nmoe.models) would
move in the same number of rounds. Bar: FedGate's stage-3 upload per round <= 5% of a full-model
FedAvg upload per round (all clients). Also: the analytic payload of one client's round (shared
gate keys, F + head, what stage 1 actually ships) and the same ratio for the CIFAR-10 ResNet setup.
Writes bench/results/comm.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import benchlib
from benchlib import (
    ALL_BASELINES,
    DEFAULT_NMOE_CONFIG,
    base_parser,
    machine_info,
    run_monitored,
    split_overrides,
    write_result,
)

NAME = "comm"
BAR_GATE_UPLOAD_FRACTION = 0.05
DATASET_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10
LABEL_BYTES = 8  # int64 label per raw sample (centralized: the data would have to be uploaded)
FE_STAGES = {"fedce": "fe_ce", "fedsc": "fe_sc", "hybrid": "fe_hybrid"}
CIFAR_PRESET = "experiment=paper_cifar10_noniid"
DEFAULTS = {"num_clients": 10, "alpha": 0.3, "seed": 0}
TINY_OVERRIDES = [
    "fe.rounds=1",
    "fe.local_epochs=1",
    "expert.epochs=1",
    "expert.shared_rounds=1",
    "gate.rounds=1",
    "gate.local_epochs=1",
    "partition=iid",
]
TINY_CLIENTS = 3


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="read every results.json under this folder (e.g. the accuracy sweep) instead of running a job",
    )
    parser.add_argument(
        "--nmoe-config", default=DEFAULT_NMOE_CONFIG, help="Hydra overrides of the NMoE under test"
    )
    parser.add_argument("--num-clients", type=int, default=DEFAULTS["num_clients"])
    parser.add_argument(
        "--overrides", default="", help="further Hydra overrides for the job this script runs"
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------- model sizes
def param_bytes(module: Any) -> int:
    return sum(p.numel() for p in module.state_dict().values()) * benchlib.BYTES_PER_FLOAT32


def model_sizes(config: dict[str, Any], num_clients: int) -> dict[str, int]:
    """float32 bytes of F, head, projector, expert, gate trunk/head for a job's config."""
    from omegaconf import OmegaConf

    from nmoe.models import STAGE1_PARTS, build_bundle, build_expert, build_gate

    model = OmegaConf.create(config["model"])
    shape = DATASET_SHAPES[config["dataset"]["name"]]
    bundle = build_bundle(model, shape, NUM_CLASSES, 0)
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
        "expert": param_bytes(build_expert(model, NUM_CLASSES, 0)),
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
    fedgate = gates.get("fedgate")
    num_experts = sizes["num_experts"]
    params = fedgate.initial_params(cfg.model, num_experts, 0)
    rounds = range(1, int(cfg.gate.rounds) + 1)
    synced = sum(
        params[k].nbytes
        for rnd in rounds
        for k in fedgate.shared_keys(cfg.gate, rnd, sorted(params))
    )
    return synced / len(rounds)


# ---------------------------------------------------------------------------- per job
def method_stages(config: dict[str, Any]) -> dict[str, list[str]]:
    """The ledger stages whose traffic each method's training needs."""
    fe = FE_STAGES[config["fe"]["method"]]
    personal = [fe, "expert"]
    stages = {
        "local_expert": personal,
        "rangate": personal,
        "shared_fe_own_head": personal,
        "rollgate": personal + ["gate_cache", "rollgate"],
        "fedgate": personal + ["gate_cache", "fedgate"],
        "fedavg": ["baseline_fedavg"] if config["fe"]["method"] == "fedsc" else [fe],
        "local_only": ["baseline_local_only"],
        "centralized": [],
    }
    stages["nmoe"] = stages[config["gate"]["method"]]
    return stages


def federated_rounds(config: dict[str, Any], stage: str, num_clients: int) -> int:
    """Rounds of a stage, counted as full FedAvg rounds (RollGate: one pass = one round of n hops)."""
    fe_rounds = int(config["fe"]["rounds"])
    rounds = {
        FE_STAGES[config["fe"]["method"]]: fe_rounds,
        "baseline_fedavg": fe_rounds,
        "fedgate": int(config["gate"]["rounds"]),
        "rollgate": int(config["gate"]["rounds"]),
    }
    if stage == "expert" and config["expert"]["shared_expert"]:
        return int(config["expert"]["shared_rounds"])
    return rounds.get(stage, 0)


def analyse_job(path: Path) -> dict[str, Any]:
    """Bytes per stage and method of one results.json, and the FedGate bar."""
    from nmoe.results import load_results

    results = load_results(path)
    config, ledger = results["config"], results["comm_bytes"]
    n = int(results["nodes"]["num_partitions"])
    sizes = model_sizes(config, n)
    full_round = n * sizes["full_model_f_plus_head"]  # one full-model FedAvg round, one direction
    zero = {"up": 0, "down": 0}
    methods = {}
    trained = set(results.get("accuracy", {}))
    for method, stages in method_stages(config).items():
        if method not in trained:
            continue
        up = sum(ledger.get(s, zero)["up"] for s in stages)
        down = sum(ledger.get(s, zero)["down"] for s in stages)
        rounds = sum(federated_rounds(config, s, n) for s in stages)
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
            raw = (
                sum(int(info["num-train"]) for info in results["nodes"]["info"].values())
                * sizes["raw_sample"]
            )
            entry["raw_training_data_upload_bytes"] = raw
        methods[method] = entry
    bar: dict[str, Any] = {"measured": "fedgate" in ledger}
    if bar["measured"]:
        gate_rounds = int(config["gate"]["rounds"])
        per_round = ledger["fedgate"]["up"] / gate_rounds
        bar.update(
            {
                "fedgate_upload_per_round": per_round,
                "full_model_fedavg_upload_per_round": full_round,
                "fraction": per_round / full_round,
                "limit": BAR_GATE_UPLOAD_FRACTION,
                "met": per_round / full_round <= BAR_GATE_UPLOAD_FRACTION,
                "analytic_shared_gate_upload_per_round": n * shared_gate_bytes(config, sizes),
                "analytic_fraction": shared_gate_bytes(config, sizes)
                / sizes["full_model_f_plus_head"],
            }
        )
    fe_stage = FE_STAGES[config["fe"]["method"]]
    fe_rounds = int(config["fe"]["rounds"])
    return {
        "results": str(path),
        "fe": config["fe"]["method"],
        "gate": config["gate"]["method"],
        "alpha": config["partition"].get("alpha"),
        "partition": config["partition"]["kind"],
        "seed": config["seed"],
        "num_clients": n,
        "model_bytes": sizes,
        "stages": ledger,
        "per_round_per_client": {
            "stage1_upload_measured": ledger[fe_stage]["up"] / (fe_rounds * n)
            if fe_stage in ledger
            else None,
            "stage1_bundle_as_shipped": sizes["stage1_bundle_as_shipped"],
            "full_model_f_plus_head": sizes["full_model_f_plus_head"],
            "fedgate_shared_keys": shared_gate_bytes(config, sizes),
        },
        "methods": methods,
        "fedgate_bar": bar,
    }


def cifar_reference(num_clients: int, nmoe_config: list[str]) -> dict[str, Any]:
    """Gate-vs-full-model ratio for the paper's CIFAR-10 ResNet setup (sizes only, no data)."""
    from nmoe.config import compose_config, to_dict

    config = to_dict(compose_config([CIFAR_PRESET, *nmoe_config]))
    sizes = model_sizes(config, num_clients)
    gate = shared_gate_bytes(config, sizes)
    return {
        "preset": CIFAR_PRESET,
        "num_clients": num_clients,
        "model_bytes": sizes,
        "fedgate_shared_keys": gate,
        "fraction": gate / sizes["full_model_f_plus_head"],
    }


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    runs = []
    if args.sweep_dir is not None:
        sweep = args.sweep_dir.resolve()
        paths = sorted(sweep.rglob("results.json"))
        if not paths:
            raise SystemExit(f"no results.json under {sweep}")
        source: dict[str, Any] = {"sweep_dir": str(sweep)}
    else:
        job_dir = (args.out_dir / "runs" / NAME).resolve()
        clients = TINY_CLIENTS if args.tiny else args.num_clients
        overrides = [
            *split_overrides(args.nmoe_config),
            f"simulation.num_clients={clients}",
            f"partition.alpha={DEFAULTS['alpha']}",
            f"seed={DEFAULTS['seed']}",
            f"baselines=[{','.join(ALL_BASELINES)}]",
            "log_level=quiet",
            f"output_dir={job_dir}",
            f"hydra.run.dir={job_dir}",
            *(TINY_OVERRIDES if args.tiny else []),
            *split_overrides(args.overrides),
        ]
        run = run_monitored(
            [str(benchlib.NMOE_CLI), *overrides], job_dir.parent / f"{NAME}.log", benchlib.REPO_ROOT
        )
        runs.append(run.as_dict())
        paths = [job_dir / "results.json"]
        source = {"job_overrides": overrides}
    jobs = [analyse_job(p) for p in paths]
    measured = [j["fedgate_bar"] for j in jobs if j["fedgate_bar"]["measured"]]
    result = {
        "config": {"nmoe_config": args.nmoe_config, **source},
        "runs": runs,
        "jobs": jobs,
        "summary": {
            "jobs": len(jobs),
            "fedgate_bar_jobs": len(measured),
            "fedgate_bar_met_in_all": bool(measured) and all(b["met"] for b in measured),
            "fedgate_fraction_max": max((b["fraction"] for b in measured), default=None),
            "fedgate_fraction_min": min((b["fraction"] for b in measured), default=None),
            "limit": BAR_GATE_UPLOAD_FRACTION,
        },
        "cifar10_resnet_reference": cifar_reference(
            args.num_clients, split_overrides(args.nmoe_config)
        ),
        "notes": [
            "Ledger bytes = array payload (with keys) + serialised ConfigRecords and MetricRecords; every train/"
            "query message carries the resolved run config as JSON, which dominates small gate rounds.",
            "full-model FedAvg = F + linear head in float32, n clients, the same number of rounds, each direction.",
            "stage 'expert' includes the shared expert H_0's FedAvg rounds when expert.shared_expert is set.",
            "centralized moves no model: its cost is uploading the raw training data (raw_training_data_upload_bytes).",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    for job in jobs:
        bar = job["fedgate_bar"]
        if bar["measured"]:
            print(
                f"[comm] {job['results']}: FedGate upload/round {bar['fedgate_upload_per_round']:.0f} B = "
                f"{100 * bar['fraction']:.1f}% of full-model FedAvg {bar['full_model_fedavg_upload_per_round']} B "
                f"(bar <= {100 * BAR_GATE_UPLOAD_FRACTION:.0f}%: {'met' if bar['met'] else 'MISSED'})",
                flush=True,
            )
    print(path)


if __name__ == "__main__":
    main()
