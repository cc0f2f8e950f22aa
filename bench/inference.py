"""Collaborative-inference throughput: the three routed waves against local batched forward passes.

    python bench/inference.py                                  # 10 clients, digits, the default NMoE config
    python bench/inference.py --nmoe-config "gate=rollgate"    # another trained gate

One in-process Flower simulation runs the real app's stages (server_app.stages: discovery,
stage 1-3, evaluation, with the project's ClientApp wrapped so each virtual node saves its
personal state to disk and logs its handler times), then routes each client's local test
split and the global test set `--repeats` more times through the three waves
(query.route -> query.expert -> query.combine), timing every wave. Afterwards, in this
process, the saved extractors, gates and experts run the same computation locally with plain
torch (F, gate, top-k, the same expert forward passes on the same samples, combine), and the
predictions are compared with the routed ones.

Writes bench/results/inference.json: samples/s routed vs local (bar: routed >= 0.5 x local),
the per-wave time breakdown, and bytes per sample on the wire (comm_bytes of the inference
stage / samples; arrays only, by wave) against sending the raw input.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import benchlib
from benchlib import DEFAULT_NMOE_CONFIG, base_parser, machine_info, median, split_overrides, write_result
from simapps import TimingGrid, TracingClientApp, read_trace

NAME = "inference"
BAR_ROUTED_OVER_LOCAL = 0.5
SPLITS = ("test", "global")
WAVES = ("query.route", "query.expert", "query.combine")
STATE_KEY = "bench-inference"
STAGE_PREFIX = "bench"
LOCAL_WARMUP_RUNS = 1
DEFAULTS = {"num_clients": 10, "repeats": 5}
TINY = {"num_clients": 3, "repeats": 1}
TINY_OVERRIDES = ["fe.rounds=1", "fe.local_epochs=1", "expert.epochs=1", "expert.shared_rounds=1",
                  "gate.rounds=1", "gate.local_epochs=1", "partition=iid"]


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=DEFAULTS["num_clients"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="routed queries per split after training (and timed local runs)")
    parser.add_argument("--nmoe-config", default=DEFAULT_NMOE_CONFIG, help="Hydra overrides of the NMoE under test")
    parser.add_argument("--overrides", default="", help="further Hydra overrides (dataset, sizes ...)")
    args = parser.parse_args()
    if args.tiny:
        args.num_clients, args.repeats = TINY["num_clients"], TINY["repeats"]
    return args


# ---------------------------------------------------------------------------- the simulation
def simulate(cfg: Any, run_dir: Path, repeats: int) -> dict[str, Any]:
    """Train with the real stages, then time `repeats` routed queries per split; return the trace."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client_app.app import app as project_client_app
    from server_app.cli import backend_config
    from server_app.stages import open_run, routed_accuracy, run_all

    gate = str(cfg.gate.method)
    out: dict[str, Any] = {"queries": []}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(int(cfg.torch_threads))
        timing = TimingGrid(grid)
        run = open_run(timing, cfg, run_dir)
        run_all(run)
        run.results.data["status"] = "completed"
        run.results.write(run_dir)
        out["results"] = json.loads(json.dumps(run.results.data))
        for repeat in range(repeats):
            for split in SPLITS:
                stage = f"{STAGE_PREFIX}.{split}.{repeat}"
                run.grid.stage = stage
                first_call = len(timing.calls)
                started = time.time()
                metrics = routed_accuracy(run, gate, split)
                finished = time.time()
                out["queries"].append({
                    "split": split, "repeat": repeat, "stage": stage, "start": started, "end": finished,
                    "samples": sum(int(m["num-examples"]) for m in metrics.values()),
                    "waves": timing.calls[first_call:],
                    "bytes": dict(run.strategy.ledger.bytes[stage]),
                    "predictions": run.results.data["predictions"][gate][split],
                })

    state_dir, trace_path = run_dir / "state", run_dir / "client_trace.jsonl"
    client_app = TracingClientApp(project_client_app, str(state_dir), str(trace_path))
    started = time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=int(cfg.simulation.num_clients),
                   backend_config=backend_config(cfg))
    out["simulation_wall_s"] = time.time() - started
    if "results" not in out or len(out["queries"]) != repeats * len(SPLITS):
        raise RuntimeError("the simulation did not complete (see the log above)")
    out["state_dir"] = state_dir / STATE_KEY
    out["trace_path"] = trace_path
    return out


# ---------------------------------------------------------------------------- local reference
def load_state(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """One node's saved personal state: group -> {key: array} (see client_app/state.py)."""
    from safetensors.torch import load_file

    from client_app.state import SEP

    groups: dict[str, dict[str, np.ndarray]] = {}
    for full_key, tensor in load_file(str(path)).items():
        group, key = full_key.split(SEP, 1)
        groups.setdefault(group, {})[key] = tensor.numpy()
    return groups


class LocalPipeline:
    """The routed computation on one machine: every node's saved F, gate and experts in memory."""

    def __init__(self, cfg: Any, state_dir: Path, neighbours: list[list[int]]) -> None:
        from nmoe.data import federation_spec, load_all_clients, num_classes
        from nmoe.models import build_bundle, build_expert, build_gate, load_numpy

        self.n = int(cfg.simulation.num_clients)
        spec = federation_spec(cfg)
        self.num_classes = num_classes(spec, self.n)
        self.k = int(cfg.gate.k)
        self.shared_id = self.n if cfg.expert.shared_expert else None
        num_experts = self.n + (1 if self.shared_id is not None else 0)
        self.data = load_all_clients(spec, self.n)
        shape = tuple(self.data[0].train_x.shape[1:])
        self.fe, self.gate, self.expert, self.shared, self.reachable = [], [], [], [], []
        for pid in range(self.n):
            state = load_state(state_dir / f"partition-{pid}.safetensors")
            bundle = build_bundle(cfg.model, shape, self.num_classes, int(cfg.seed))
            load_numpy(bundle, state["model/fe"])
            gate = build_gate(cfg.model, num_experts, int(cfg.seed))
            load_numpy(gate, state[f"model/gate.{cfg.gate.method}"])
            expert = build_expert(cfg.model, self.num_classes, 0)
            load_numpy(expert, state["model/expert"])
            self.fe.append(bundle.fe)
            self.gate.append(gate)
            self.expert.append(expert)
            if self.shared_id is not None:
                shared = build_expert(cfg.model, self.num_classes, 0)
                load_numpy(shared, state["model/shared_expert"])
                self.shared.append(shared)
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[neighbours[pid]] = True
            if self.shared_id is not None:
                mask[self.shared_id] = True
            self.reachable.append(mask)
        self.raw_bytes_per_sample = int(np.prod(shape)) * benchlib.BYTES_PER_FLOAT32

    def inputs(self, pid: int, split: str) -> torch.Tensor:
        d = self.data[pid]
        return {"test": d.test_x, "global": d.global_x}[split]

    def run(self, split: str) -> tuple[dict[int, list[int]], float, float]:
        """Predictions of every client on `split`, seconds for the whole pipeline and for the
        expert forward passes alone."""
        from nmoe.inference import assemble, plan_route
        from nmoe.routing import combine
        from nmoe.training import forward_batched, gate_weights

        predictions, experts_s = {}, 0.0
        started = time.perf_counter()
        for pid in range(self.n):
            feats = forward_batched(self.fe[pid], self.inputs(pid, split))
            weights = gate_weights(self.gate[pid], feats, self.reachable[pid], self.k)
            local = {pid: self.expert[pid]}
            if self.shared_id is not None:
                local[self.shared_id] = self.shared[pid]
            experts_start = time.perf_counter()
            plan = plan_route(weights, feats, local)
            remote = {e: forward_batched(self.expert[e], feats[index]) for e, index in plan.remote_index.items()}
            experts_s += time.perf_counter() - experts_start
            logits, answered = assemble(plan, remote, self.num_classes)
            combined, _ = combine(weights, logits, answered, fallback=pid)
            predictions[pid] = [int(p) for p in combined.argmax(dim=1)]
        return predictions, time.perf_counter() - started, experts_s


# ---------------------------------------------------------------------------- analysis
def audit_array_bytes(audit_path: Path) -> dict[str, dict[str, int]]:
    """stage -> "<direction> <message type>" -> array bytes, from the app's messages.jsonl."""
    out: dict[str, dict[str, int]] = {}
    for line in audit_path.read_text().splitlines():
        row = json.loads(line)
        size = sum(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in row["arrays"].values())
        per_stage = out.setdefault(row["stage"], {})
        key = f"{row['direction']} {row['type']}"
        per_stage[key] = per_stage.get(key, 0) + size
    return out


def wave_breakdown(queries: list[dict[str, Any]], trace: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    """Per split and wave: median wall time, client handler time (sum, max) and the rest."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        rows: dict[str, list[dict[str, float]]] = {wave: [] for wave in WAVES}
        server_rest = []
        for q in (q for q in queries if q["split"] == split):
            for call in q["waves"]:
                handlers = [t["end"] - t["start"] for t in trace
                            if t["type"] == call["type"] and call["start"] <= t["start"] <= call["end"]]
                ideal = max(sum(handlers) / parallel, max(handlers, default=0.0))
                rows[call["type"]].append({"wall_s": call["end"] - call["start"], "messages": call["messages"],
                                           "handler_sum_s": sum(handlers), "handler_max_s": max(handlers, default=0.0),
                                           "overhead_s": call["end"] - call["start"] - ideal})
            server_rest.append((q["end"] - q["start"]) - sum(c["end"] - c["start"] for c in q["waves"]))
        out[split] = {wave: {key: median([r[key] for r in values]) for key in values[0]} if values else {}
                      for wave, values in rows.items()}
        out[split]["server_outside_waves_s"] = median(server_rest)
    return out


def compare_split(local: LocalPipeline, split: str, queries: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Routed queries of one split against timed local runs of the same computation."""
    for _ in range(LOCAL_WARMUP_RUNS):
        local.run(split)
    runs = [local.run(split) for _ in range(max(1, repeats))]
    local_predictions = runs[0][0]
    samples = queries[0]["samples"]
    routed_s = median([q["end"] - q["start"] for q in queries])
    local_s, experts_s = median([r[1] for r in runs]), median([r[2] for r in runs])
    agree = [int(a == b) for q in queries for pid, preds in q["predictions"].items()
             for a, b in zip(preds, local_predictions[int(pid)], strict=True)]
    return {
        "samples": samples,
        "routed_s_median": routed_s,
        "routed_s_all": [q["end"] - q["start"] for q in queries],
        "local_pipeline_s_median": local_s,
        "local_experts_only_s_median": experts_s,
        "routed_samples_per_s": samples / routed_s,
        "local_samples_per_s": samples / local_s,
        "local_experts_only_samples_per_s": samples / experts_s if experts_s > 0 else math.inf,
        "routed_over_local": local_s / routed_s,
        "bar_met": local_s / routed_s >= BAR_ROUTED_OVER_LOCAL,
        "prediction_agreement": sum(agree) / max(len(agree), 1),
        "wire_bytes_per_sample_ledger": median([(q["bytes"]["up"] + q["bytes"]["down"]) / q["samples"] for q in queries]),
    }


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    benchlib.expose_bench_to_ray_workers()
    from nmoe.config import compose_config, to_dict

    run_dir = (args.out_dir / "runs" / NAME).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [f"simulation.num_clients={args.num_clients}", *split_overrides(args.nmoe_config), "baselines=[]",
                 "record_predictions=true", "audit_messages=true", f"state_key={STATE_KEY}", f"output_dir={run_dir}",
                 *(TINY_OVERRIDES if args.tiny else []), *split_overrides(args.overrides)]
    cfg = compose_config(overrides)
    if cfg.gate.method == "rangate":
        raise SystemExit("inference.py needs a trained gate (rollgate or fedgate): its local reference loads it")
    print(f"[inference] simulation: {args.num_clients} clients, {args.repeats} timed queries per split", flush=True)
    sim = simulate(cfg, run_dir, args.repeats)
    results = sim["results"]
    local = LocalPipeline(cfg, sim["state_dir"], results["topology"]["neighbours"])
    trace = read_trace(sim["trace_path"])
    parallel = max(1, min(args.num_clients, int((started_machine["cpu_count"] or 1) // float(cfg.simulation.client_cpus))))
    torch.set_num_threads(int(cfg.torch_threads))

    per_split = {split: compare_split(local, split, [q for q in sim["queries"] if q["split"] == split], args.repeats)
                 for split in SPLITS}
    largest = max(per_split.values(), key=lambda v: v["samples"])
    # The routed time barely grows with the samples (fixed per-wave latency): the samples one query
    # would need for the bar if its time stayed fixed (a lower bound; local throughput also grows).
    samples_for_bar = BAR_ROUTED_OVER_LOCAL * largest["local_samples_per_s"] * largest["routed_s_median"]
    audit = audit_array_bytes(run_dir / "messages.jsonl")
    first_query = {split: audit[f"{STAGE_PREFIX}.{split}.0"] for split in SPLITS}
    arrays_by_split = {split: {key: value / per_split[split]["samples"] for key, value in first_query[split].items()}
                       for split in SPLITS}
    inference_stage = results["comm_bytes"].get("inference", {"up": 0, "down": 0})
    stage_samples = sum(v["samples"] for v in results["inference_latency"][str(cfg.gate.method)].values())
    result = {
        "config": {"nmoe_config": args.nmoe_config, "nmoe_overrides": overrides, "repeats": args.repeats,
                   "parallel_clients": parallel, "resolved": to_dict(cfg)},
        "simulation_wall_s": sim["simulation_wall_s"],
        "per_split": per_split,
        "waves": wave_breakdown(sim["queries"], trace, parallel),
        "samples_per_query_for_bar_lower_bound": samples_for_bar,
        "run_inference_latency": results["inference_latency"],
        "bytes": {
            "raw_input_bytes_per_sample": local.raw_bytes_per_sample,
            "inference_stage_comm_bytes": inference_stage,
            "inference_stage_samples": stage_samples,
            "inference_stage_bytes_per_sample": (inference_stage["up"] + inference_stage["down"]) / stage_samples,
            "array_bytes_per_sample_by_wave": arrays_by_split,
            "array_bytes_per_sample_total": {s: sum(v.values()) for s, v in arrays_by_split.items()},
        },
        "bar": {"routed_over_local_min": BAR_ROUTED_OVER_LOCAL,
                "met": all(v["bar_met"] for v in per_split.values())},
        "notes": [
            "routed_s: one routed_accuracy call (3 waves, every client a requester) timed in the ServerApp; "
            "local_pipeline_s: the same F + gate + expert forward passes + combine for every client, one process, "
            f"{cfg.torch_threads} torch thread(s), models in memory; experts_only: the expert forward passes alone.",
            "wire bytes (ledger) count array payload plus serialised configs and metrics, both directions, "
            "server relay included (a feature crosses two hops: requester -> server -> expert owner).",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    for split, v in per_split.items():
        print(f"[inference] {split}: {v['samples']} samples, routed {v['routed_samples_per_s']:.0f}/s vs local "
              f"{v['local_samples_per_s']:.0f}/s = {v['routed_over_local']:.4f}x (bar >= {BAR_ROUTED_OVER_LOCAL}); "
              f"agreement {v['prediction_agreement']:.4f}; {v['wire_bytes_per_sample_ledger']:.0f} B/sample on the wire "
              f"vs {local.raw_bytes_per_sample} B raw", flush=True)
    print(path)


if __name__ == "__main__":
    main()
