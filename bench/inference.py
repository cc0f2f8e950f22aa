"""Collaborative-inference throughput: the three routed waves against local batched forward
passes.

    python bench/inference.py                                # 10 clients, the default NMoE config
    python bench/inference.py --nmoe-config "gate=rollgate"  # another gate (any of the registry)

One in-process Flower simulation runs the real app's stages (server_app.stages: discovery,
stage 1-3, evaluation, with the project's ClientApp wrapped so each virtual node saves its
personal state to disk and logs its handler times), then sends every load of LOADS `--repeats`
times through the three waves (query.route -> query.expert -> query.combine), timing every
wave; a load is the splits each requester coalesces into one query (296 to 217,600 samples per
set of waves on digits). Afterwards, in this process, the saved extractors, gates and experts
run the same computation locally with plain torch (F, the gate's weights with the same seeds,
local-first, the same expert forward passes on the same samples, the experts' familiarity for a
gate that asks it, combine), with one torch thread and with all cores, and the predictions are
compared with the routed ones.

Writes bench/results/inference.json: samples/s routed vs local (bar: routed >= 0.5 x local),
the per-wave time breakdown, and bytes per sample on the wire (comm_bytes of the inference
stage / samples; arrays only, by wave) against sending the raw input.

    python bench/inference.py --compare-sealing              # sealed relay on vs off

With `--compare-sealing` the same trained federation answers every load with sealed payloads
(`seal_payloads=true`) and in clear (`false`), switched by a new set-up wave to every node: for
each repeat and load one sealed and one plain query back to back, the order alternating (sealed
first, then plain first), so both settings see the same models, samples and machine state.
Writes bench/results/inference_seal.json: per load the routed times of both settings, the
overhead of sealing (bar: <= 10% of the routed time), the handlers' CPU time per wave, and
whether the predictions agree; no local reference is run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
from benchlib import (
    DEFAULT_NMOE_CONFIG,
    base_parser,
    machine_info,
    median,
    split_overrides,
    write_result,
)
from simapps import TimingGrid, TracingClientApp, read_trace

NAME = "inference"
SEAL_NAME = "inference_seal"
BAR_ROUTED_OVER_LOCAL = 0.5
BAR_SEALING_OVERHEAD = 0.10  # sealing may add at most 10% to the routed inference time
# What each requester asks in one set of waves: a name -> the splits coalesced into the query.
# `test+global` is the app's own evaluation query; `global xR` replays R copies of the global test
# set per requester (a pending queue of R requests served by one set of waves: dynamic batching).
LOADS = {
    "test": ["test"],
    "test+global": ["test", "global"],
    "global x4": ["global"] * 4,
    "global x16": ["global"] * 16,
    "global x64": ["global"] * 64,
}
TINY_LOADS = {"test": ["test"], "test+global": ["test", "global"], "global x2": ["global"] * 2}
WAVES = ("query.route", "query.expert", "query.combine")
# The purpose term of the route wave's generator seed (client_app.app.route seeds it with
# node.seed(9, request.seed); the evaluation's queries carry the run seed): random gates agree.
ROUTE_SEED_PURPOSE = 9
STATE_KEY = "bench-inference"
# The nodes' owners allow the largest load: `global x64` sends an expert owner up to ~141,000
# rows in one message (every requester's batch), above the default node policy's max-rows=100000.
NODE_CONFIG = {"max-rows": 400_000}
STAGE_PREFIX = "bench"
LOCAL_WARMUP_RUNS = 1
DEFAULTS = {"num_clients": 10, "repeats": 5}
TINY = {"num_clients": 3, "repeats": 1}
TINY_OVERRIDES = benchlib.as_overrides({**benchlib.TINY_SIZES, "partition": "iid"})


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=DEFAULTS["num_clients"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULTS["repeats"],
        help="routed queries per split after training (and timed local runs)",
    )
    parser.add_argument(
        "--nmoe-config", default=DEFAULT_NMOE_CONFIG, help="Hydra overrides of the NMoE under test"
    )
    parser.add_argument(
        "--overrides", default="", help="further Hydra overrides (dataset, sizes ...)"
    )
    parser.add_argument(
        "--compare-sealing",
        action="store_true",
        help="time every load with sealed and with plain peer payloads (inference_seal.json)",
    )
    args = parser.parse_args()
    args.loads = LOADS
    if args.tiny:
        args.num_clients, args.repeats, args.loads = (
            TINY["num_clients"],
            TINY["repeats"],
            TINY_LOADS,
        )
    return args


# ---------------------------------------------------------------------------- the simulation
def set_sealing(run: Any, sealed: bool) -> None:
    """Switch every node and the router to sealed (or plain) peer payloads: a new set-up wave
    with the run's config, `seal_payloads` changed (personal state and key pins are kept)."""
    from nmoe.config import to_dict
    from nmoe_protocol import messages as wire

    config = {**to_dict(run.cfg), "seal_payloads": sealed}
    request = wire.SetupRequest(config_json=json.dumps(config, sort_keys=True))
    replies = run.broadcast(request, wire.NodeInfo)
    if sorted(replies) != sorted(run.pids):
        raise RuntimeError(f"seal_payloads={sealed}: only {sorted(replies)} accepted the set-up")
    run.router.sealed = sealed


def simulate(
    cfg: Any,
    run_dir: Path,
    repeats: int,
    loads: dict[str, list[str]],
    compare_sealing: bool = False,
) -> dict[str, Any]:
    """Train with the real stages, then time `repeats` routed queries per load (with
    `compare_sealing`: one sealed and one plain query per repeat and load, in alternating
    order); return the trace."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client_app.app import app as project_client_app
    from server_app.app import run_stages
    from server_app.cli import backend_config
    from server_app.run import open_run

    gate = str(cfg.gate.method)
    out: dict[str, Any] = {"queries": []}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(int(cfg.torch_threads))
        timing = TimingGrid(grid)
        run = open_run(timing, cfg, run_dir)
        run_stages(run)
        run.results.mark_completed()
        run.results.write(run_dir)
        out["results"] = json.loads(json.dumps(run.results.data))
        modes = [True, False] if compare_sealing else [bool(cfg.seal_payloads)]
        for repeat in range(repeats):
            for index, (load, splits) in enumerate(loads.items()):
                order = modes if (repeat + index) % 2 == 0 else modes[::-1]
                for position, sealed in enumerate(order):
                    if run.router.sealed != sealed:
                        run.grid.stage = f"{STAGE_PREFIX}.setup"
                        set_sealing(run, sealed)
                    stage = f"{STAGE_PREFIX}.{load}.{repeat}"
                    if compare_sealing:
                        stage += ".sealed" if sealed else ".plain"
                    query = time_query(run, timing, gate, splits, stage)
                    out["queries"].append(
                        {
                            "load": load,
                            "repeat": repeat,
                            "sealed": sealed,
                            "position": position,
                            **query,
                        }
                    )

    state_dir, trace_path = run_dir / "state", run_dir / "client_trace.jsonl"
    client_app = TracingClientApp(project_client_app, str(state_dir), str(trace_path), NODE_CONFIG)
    started = time.time()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(cfg.simulation.num_clients),
        backend_config=backend_config(cfg),
    )
    out["simulation_wall_s"] = time.time() - started
    expected = repeats * len(loads) * (2 if compare_sealing else 1)
    if "results" not in out or len(out["queries"]) != expected:
        raise RuntimeError("the simulation did not complete (see the log above)")
    out["state_dir"] = state_dir / STATE_KEY
    out["trace_path"] = trace_path
    return out


def time_query(run: Any, timing: Any, gate: str, splits: list[str], stage: str) -> dict[str, Any]:
    """One routed query (three waves) as stage `stage`: its times, waves, bytes, predictions."""
    from server_app.stages.evaluation import routed_accuracy

    run.grid.stage = stage
    first_call = len(timing.calls)
    started = time.time()
    per_split = routed_accuracy(run, gate, splits)
    finished = time.time()
    return {
        "stage": stage,
        "start": started,
        "end": finished,
        "samples": sum(int(m["num-examples"]) for metrics in per_split for m in metrics.values()),
        "waves": timing.calls[first_call:],
        "bytes": dict(run.ledger.bytes[stage]),
        "predictions": {
            str(p): [v for metrics in per_split for v in metrics[p]["predictions"]]
            for p in per_split[0]
        },
    }


# ---------------------------------------------------------------------------- local reference
class LocalPipeline:
    """The routed computation on one machine: every node's saved F, gate and experts in memory,
    run through the same functions the ClientApp's handlers call (nmoe.pipeline, the gate's
    `weights` and, for gates that ask familiarity, `nmoe.routing.familiarity` and `reweight`),
    with the same seeds and data splits."""

    def __init__(self, cfg: Any, state_dir: Path, neighbours: list[list[int]]) -> None:
        from client_app.node import (
            FE_GROUP,
            LOCAL_HEAD_GROUP,
            gate_group,
            held_experts,
            held_local_head,
        )
        from client_app.state import read_state_file
        from nmoe import gates
        from nmoe.data import (
            SEED_EXPERT_SPLIT,
            client_seed,
            federation_spec,
            holdout_split,
            labelled,
            load_all_clients,
            num_classes,
        )
        from nmoe.models import build_bundle, load_numpy

        self.cfg = cfg
        self.n = int(cfg.simulation.num_clients)
        self.seed = int(cfg.seed)
        spec = federation_spec(cfg)
        self.num_classes = num_classes(spec, self.n)
        self.gate = gates.get(str(cfg.gate.method))
        self.shared_id = self.n if cfg.expert.shared_expert else None
        num_experts = self.n + (1 if self.shared_id is not None else 0)
        self.data = load_all_clients(spec, self.n)
        shape = tuple(self.data[0].train_x.shape[1:])
        holdout = float(cfg.expert.gate_holdout_fraction)
        self.fe, self.heads, self.gate_params, self.experts, self.reachable = [], [], [], [], []
        self.local_heads: list[torch.nn.Module | None] = []  # as `Node.local_head`
        # each owner's expert-training images (familiarity) and labels, as `Node.split`
        self.expert_x, self.expert_y = [], []
        for pid in range(self.n):
            state = read_state_file(state_dir / f"partition-{pid}.safetensors")
            bundle = build_bundle(cfg.model, shape, self.num_classes, self.seed)
            load_numpy(bundle, state[FE_GROUP], strict=False)
            self.fe.append(bundle.fe)
            self.heads.append(bundle.head)
            trained = self.gate.trainable
            self.gate_params.append(state[gate_group(self.gate.name)] if trained else {})
            self.experts.append(
                held_experts(
                    cfg,
                    self.num_classes,
                    pid,
                    self.shared_id,
                    state.__getitem__,
                    lambda head=bundle.head: head,
                )
            )
            self.local_heads.append(
                held_local_head(
                    cfg, self.num_classes, state.get(LOCAL_HEAD_GROUP), lambda h=bundle.head: h
                )
            )
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[neighbours[pid]] = True
            if self.shared_id is not None:
                mask[self.shared_id] = True
            self.reachable.append(mask)
            x, y = labelled(self.data[pid])
            split_seed = client_seed(self.seed, pid, SEED_EXPERT_SPLIT)
            (ex, ey), _ = holdout_split(x, y, holdout, split_seed)
            self.expert_x.append(ex)
            self.expert_y.append(ey)
        self.raw_bytes_per_sample = int(np.prod(shape)) * benchlib.BYTES_PER_FLOAT32

    def inputs(self, pid: int, splits: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data[pid]
        parts = [
            {"test": (d.test_x, d.test_y), "global": (d.global_x, d.global_y)}[s] for s in splits
        ]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def outside_own_classes(self, pid: int, feats: torch.Tensor) -> torch.Tensor | None:
        """The class check of `Node.local_rows` on the requester (None: not configured)."""
        from nmoe.routing import outside_own_classes
        from nmoe.training import forward_batched

        g = self.cfg.gate
        if float(g.local_first_class_confidence) <= 0:
            return None
        head_logits = forward_batched(self.heads[pid], feats)
        confidence, least = float(g.local_first_class_confidence), int(g.local_first_class_min)
        return outside_own_classes(head_logits, self.expert_y[pid], confidence, least)

    def familiarity(self, owner: int, feats: torch.Tensor) -> torch.Tensor:
        """What `Node.familiarity` computes on the owner: its familiarity with each row."""
        from nmoe.routing import familiarity
        from nmoe.training import forward_batched

        own = forward_batched(self.fe[owner], self.expert_x[owner])
        return familiarity(feats, own, float(self.cfg.gate.know_quantile))

    def run(self, splits: list[str]) -> tuple[dict[int, list[int]], float, float]:
        """Predictions of every client on its `splits` (one batch), seconds for the whole pipeline
        and for the expert owners' part alone (forward passes and familiarity)."""
        from nmoe.data import client_seed
        from nmoe.pipeline import PendingQuery, answer, finish_query, plan_query
        from nmoe.routing import local_first_mask
        from nmoe.training import forward_batched

        predictions, experts_s = {}, 0.0
        quantile = float(self.cfg.gate.local_first_quantile)
        k = int(self.cfg.gate.k)
        asks = self.gate.asks_familiarity
        started = time.perf_counter()
        for pid in range(self.n):
            x, y = self.inputs(pid, splits)
            feats = forward_batched(self.fe[pid], x)
            route_seed = client_seed(self.seed, pid, ROUTE_SEED_PURPOSE, self.seed)
            weights = self.gate.weights(
                self.gate_params[pid],
                feats,
                self.reachable[pid],
                k,
                self.cfg.model,
                torch.Generator().manual_seed(route_seed),
            )
            own_feats = (
                forward_batched(self.fe[pid], self.data[pid].train_x) if quantile > 0 else None
            )
            local = None
            if own_feats is not None:  # as `Node.local_rows` (no owner floor in simulation)
                not_local = self.outside_own_classes(pid, feats)
                local = local_first_mask(feats, own_feats, quantile, not_local)
            plan = plan_query(feats, weights, self.experts[pid], pid, local, self.local_heads[pid])
            own_ratio = self.familiarity(pid, feats) if asks else None
            experts_start = time.perf_counter()
            remote = {
                e: answer(self.experts[e][e], {pid: feats[index]})[pid]
                for e, index in plan.remote_index.items()
            }
            ratios = (
                {e: self.familiarity(e, feats[index]) for e, index in plan.remote_index.items()}
                if asks
                else {}
            )
            experts_s += time.perf_counter() - experts_start
            reweight = (
                partial(
                    self.gate.reweight, own=pid, shared=self.shared_id, k=k, gate_cfg=self.cfg.gate
                )
                if asks
                else None
            )
            shift = self.gate.prior_shift(
                self.cfg.gate, self.expert_y[pid], self.num_classes, self.shared_id
            )  # None for gates with no wave-3 blend
            pending = PendingQuery(plan, y, [len(y)], "infer", self.gate.name, own_ratio)
            reports = finish_query(pending, remote, self.num_classes, pid, ratios, reweight, shift)
            predictions[pid] = reports[0].predictions
        return predictions, time.perf_counter() - started, experts_s


# ---------------------------------------------------------------------------- analysis
def audit_array_bytes(audit_path: Path) -> dict[str, dict[str, int]]:
    """stage -> "<direction> <message type>" -> array bytes, from the app's messages.jsonl."""
    out: dict[str, dict[str, int]] = {}
    for line in audit_path.read_text().splitlines():
        row = json.loads(line)
        size = sum(
            int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in row["arrays"].values()
        )
        per_stage = out.setdefault(row["stage"], {})
        key = f"{row['direction']} {row['type']}"
        per_stage[key] = per_stage.get(key, 0) + size
    return out


def wave_breakdown(
    queries: list[dict[str, Any]], trace: list[dict[str, Any]], parallel: int
) -> dict[str, Any]:
    """Per load and wave: median wall time, client handler time (sum, max) and the rest."""
    out: dict[str, Any] = {}
    for load in dict.fromkeys(q["load"] for q in queries):
        rows: dict[str, list[dict[str, float]]] = {wave: [] for wave in WAVES}
        server_rest = []
        for q in (q for q in queries if q["load"] == load):
            for call in q["waves"]:
                handlers = [
                    t["end"] - t["start"]
                    for t in trace
                    if t["type"] == call["type"] and call["start"] <= t["start"] <= call["end"]
                ]
                ideal = max(sum(handlers) / parallel, max(handlers, default=0.0))
                rows[call["type"]].append(
                    {
                        "wall_s": call["end"] - call["start"],
                        "messages": call["messages"],
                        "handler_sum_s": sum(handlers),
                        "handler_max_s": max(handlers, default=0.0),
                        "overhead_s": call["end"] - call["start"] - ideal,
                    }
                )
            server_rest.append(
                (q["end"] - q["start"]) - sum(c["end"] - c["start"] for c in q["waves"])
            )
        out[load] = {
            wave: {key: median([r[key] for r in values]) for key in values[0]} if values else {}
            for wave, values in rows.items()
        }
        out[load]["server_outside_waves_s"] = median(server_rest)
    return out


def timed_local_runs(
    local: LocalPipeline, splits: list[str], repeats: int, threads: int
) -> list[tuple[Any, float, float]]:
    """`repeats` timed local runs (after warm-up) with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(LOCAL_WARMUP_RUNS):
            local.run(splits)
        return [local.run(splits) for _ in range(max(1, repeats))]
    finally:
        torch.set_num_threads(before)


def compare_load(
    local: LocalPipeline,
    splits: list[str],
    queries: list[dict[str, Any]],
    repeats: int,
    client_threads: int,
    machine_threads: int,
) -> dict[str, Any]:
    """Routed queries of one load against timed local runs of the same computation (with the
    clients' torch threads, and with every core of the machine)."""
    runs = timed_local_runs(local, splits, repeats, client_threads)
    all_cores = timed_local_runs(local, splits, repeats, machine_threads)
    local_predictions = runs[0][0]
    samples = queries[0]["samples"]
    routed_s = median([q["end"] - q["start"] for q in queries])
    local_s, experts_s = median([r[1] for r in runs]), median([r[2] for r in runs])
    all_cores_s = median([r[1] for r in all_cores])
    agree = [
        int(a == b)
        for q in queries
        for pid, preds in q["predictions"].items()
        for a, b in zip(preds, local_predictions[int(pid)], strict=True)
    ]
    return {
        "splits_per_requester": splits,
        "samples": samples,
        "routed_s_median": routed_s,
        "routed_s_all": [q["end"] - q["start"] for q in queries],
        "local_pipeline_s_median": local_s,
        "local_pipeline_all_cores_s_median": all_cores_s,
        "local_experts_only_s_median": experts_s,
        "routed_samples_per_s": samples / routed_s,
        "local_samples_per_s": samples / local_s,
        "local_all_cores_samples_per_s": samples / all_cores_s,
        "local_experts_only_samples_per_s": samples / experts_s if experts_s > 0 else math.inf,
        "routed_over_local": local_s / routed_s,
        "routed_over_local_all_cores": all_cores_s / routed_s,
        "bar_met": local_s / routed_s >= BAR_ROUTED_OVER_LOCAL,
        "prediction_agreement": sum(agree) / max(len(agree), 1),
        "wire_bytes_per_sample_ledger": median(
            [(q["bytes"]["up"] + q["bytes"]["down"]) / q["samples"] for q in queries]
        ),
    }


def handler_seconds(
    query: dict[str, Any], trace: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per wave of one query: the handlers' summed CPU and wall seconds (from the trace)."""
    out = {}
    for call in query["waves"]:
        rows = [
            t
            for t in trace
            if t["type"] == call["type"] and call["start"] <= t["start"] <= call["end"]
        ]
        out[call["type"]] = {
            "cpu_s": sum(t["cpu_s"] for t in rows),
            "wall_s": sum(t["end"] - t["start"] for t in rows),
        }
    return out


def sealing_per_load(queries: list[dict[str, Any]], trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Sealed against plain queries of one load: times, overhead, handler CPU, agreement."""

    def seconds(q: dict[str, Any]) -> float:
        return q["end"] - q["start"]

    by_mode = {
        m: [q for q in queries if q["sealed"] == (m == "sealed")] for m in ("sealed", "plain")
    }
    pairs = [
        (s, p) for s in by_mode["sealed"] for p in by_mode["plain"] if s["repeat"] == p["repeat"]
    ]
    ratios = [seconds(s) / seconds(p) for s, p in pairs]
    by_order = {
        first: [
            seconds(s) / seconds(p) for s, p in pairs if (s["position"] == 0) == (first == "sealed")
        ]
        for first in ("sealed", "plain")
    }
    medians = {m: median([seconds(q) for q in qs]) for m, qs in by_mode.items()}
    handlers = {}
    for mode, qs in by_mode.items():
        per_query = [handler_seconds(q, trace) for q in qs]
        handlers[mode] = {
            wave: {
                key: median([h[wave][key] for h in per_query if wave in h])
                for key in ("cpu_s", "wall_s")
            }
            for wave in WAVES
        }
        handlers[mode]["total_cpu_s"] = median(
            [sum(w["cpu_s"] for w in h.values()) for h in per_query]
        )
    agree = [
        int(a == b)
        for s, p in pairs
        for pid, preds in s["predictions"].items()
        for a, b in zip(preds, p["predictions"][pid], strict=True)
    ]
    overhead = medians["sealed"] / medians["plain"] - 1
    return {
        "samples": queries[0]["samples"],
        "sealed_s_all": [seconds(q) for q in by_mode["sealed"]],
        "plain_s_all": [seconds(q) for q in by_mode["plain"]],
        "sealed_s_median": medians["sealed"],
        "plain_s_median": medians["plain"],
        "overhead_of_medians": overhead,
        "paired_ratio_all": ratios,
        "overhead_paired_median": median(ratios) - 1,
        "overhead_paired_median_by_first": {k: median(v) - 1 for k, v in by_order.items()},
        "handlers_median": handlers,
        "wire_bytes_per_sample_ledger": {
            mode: median([(q["bytes"]["up"] + q["bytes"]["down"]) / q["samples"] for q in qs])
            for mode, qs in by_mode.items()
        },
        "prediction_agreement": sum(agree) / max(len(agree), 1),
        "bar_met": overhead <= BAR_SEALING_OVERHEAD,
    }


def write_sealing_comparison(
    args: Any, cfg: Any, overrides: list[str], sim: dict[str, Any], started: dict[str, Any]
) -> None:
    """inference_seal.json: the sealed relay against plain payloads, per load."""
    from nmoe.config import to_dict

    trace = read_trace(sim["trace_path"])
    per_load = {
        load: sealing_per_load([q for q in sim["queries"] if q["load"] == load], trace)
        for load in args.loads
    }
    total = {
        mode: sum(v[f"{mode}_s_median"] for v in per_load.values()) for mode in ("sealed", "plain")
    }
    result = {
        "config": {
            "nmoe_config": args.nmoe_config,
            "nmoe_overrides": overrides,
            "repeats": args.repeats,
            "loads": args.loads,
            "node_config": NODE_CONFIG,
            "resolved": to_dict(cfg),
        },
        "simulation_wall_s": sim["simulation_wall_s"],
        "per_load": per_load,
        "overhead_all_loads": total["sealed"] / total["plain"] - 1,
        "bar": {
            "sealing_overhead_max": BAR_SEALING_OVERHEAD,
            "met_at_every_load": all(v["bar_met"] for v in per_load.values()),
            "worst_load_overhead": max(v["overhead_of_medians"] for v in per_load.values()),
        },
        "notes": [
            "One simulation, one trained federation: after training, each repeat answers every "
            "load once with sealed payloads and once in clear, back to back, the order "
            "alternating between (repeat, load) pairs; a set-up wave to every node switches "
            "seal_payloads (personal state and key pins stay).",
            "routed_s: one routed_accuracy call (3 waves, every client a requester) timed in "
            "the ServerApp; overhead_of_medians = median sealed / median plain - 1; "
            "overhead_paired_median: the median of sealed / plain within each repeat, minus 1.",
            "handlers_median: per wave, the client handlers' summed CPU and wall seconds "
            "(TracingClientApp), median over the queries of each setting.",
        ],
    }
    path = write_result(args.out_dir, SEAL_NAME, result, started)
    for load, v in per_load.items():
        print(
            f"[inference] {load}: {v['samples']} samples, sealed {v['sealed_s_median']:.3f} s vs "
            f"plain {v['plain_s_median']:.3f} s: {100 * v['overhead_of_medians']:+.1f}% "
            f"(paired {100 * v['overhead_paired_median']:+.1f}%); agreement "
            f"{v['prediction_agreement']:.4f}",
            flush=True,
        )
    print(f"[inference] all loads: {100 * result['overhead_all_loads']:+.1f}%")
    print(path)


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    benchlib.expose_bench_to_ray_workers()
    from nmoe.config import compose_config, to_dict

    run_dir = (args.out_dir / "runs" / (SEAL_NAME if args.compare_sealing else NAME)).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [
        f"simulation.num_clients={args.num_clients}",
        *split_overrides(args.nmoe_config),
        "baselines=[]",
        "record_predictions=true",
        "audit_messages=true",
        f"state_key={STATE_KEY}",
        f"output_dir={run_dir}",
        *(TINY_OVERRIDES if args.tiny else []),
        *split_overrides(args.overrides),
        *(["seal_payloads=true"] if args.compare_sealing else []),
    ]
    cfg = compose_config(overrides)
    print(
        f"[inference] simulation: {args.num_clients} clients, {args.repeats} timed queries "
        f"per split{' and setting (sealed, plain)' if args.compare_sealing else ''}",
        flush=True,
    )
    sim = simulate(cfg, run_dir, args.repeats, args.loads, args.compare_sealing)
    if args.compare_sealing:
        write_sealing_comparison(args, cfg, overrides, sim, started_machine)
        return
    results = sim["results"]
    local = LocalPipeline(cfg, sim["state_dir"], results["topology"]["neighbours"])
    trace = read_trace(sim["trace_path"])
    cores = int(started_machine["cpu_count"] or 1)
    parallel = max(1, min(args.num_clients, int(cores // float(cfg.simulation.client_cpus))))
    torch.set_num_threads(int(cfg.torch_threads))

    per_load = {
        load: compare_load(
            local,
            splits,
            [q for q in sim["queries"] if q["load"] == load],
            args.repeats,
            int(cfg.torch_threads),
            cores,
        )
        for load, splits in args.loads.items()
    }
    meeting = [v["samples"] for v in per_load.values() if v["bar_met"]]
    audit = audit_array_bytes(run_dir / "messages.jsonl")
    arrays_by_load = {
        load: {
            key: value / per_load[load]["samples"]
            for key, value in audit[f"{STAGE_PREFIX}.{load}.0"].items()
        }
        for load in args.loads
    }
    inference_stage = results["comm_bytes"].get("inference", {"up": 0, "down": 0})
    stage_samples = int(results["inference_latency"][str(cfg.gate.method)]["samples"])
    result = {
        "config": {
            "nmoe_config": args.nmoe_config,
            "nmoe_overrides": overrides,
            "repeats": args.repeats,
            "loads": args.loads,
            "node_config": NODE_CONFIG,
            "parallel_clients": parallel,
            "resolved": to_dict(cfg),
        },
        "simulation_wall_s": sim["simulation_wall_s"],
        "per_load": per_load,
        "waves": wave_breakdown(sim["queries"], trace, parallel),
        "run_inference_latency": results["inference_latency"],
        "bytes": {
            "raw_input_bytes_per_sample": local.raw_bytes_per_sample,
            "inference_stage_comm_bytes": inference_stage,
            "inference_stage_samples": stage_samples,
            "inference_stage_bytes_per_sample": (inference_stage["up"] + inference_stage["down"])
            / stage_samples,
            "array_bytes_per_sample_by_wave": arrays_by_load,
            "array_bytes_per_sample_total": {
                load: sum(v.values()) for load, v in arrays_by_load.items()
            },
        },
        "bar": {
            "routed_over_local_min": BAR_ROUTED_OVER_LOCAL,
            "met_at_largest_load": per_load[max(per_load, key=lambda n: per_load[n]["samples"])][
                "bar_met"
            ],
            "met_from_samples_per_query": min(meeting) if meeting else None,
            "met_at_every_load": all(v["bar_met"] for v in per_load.values()),
        },
        "notes": [
            "routed_s: one routed_accuracy call (3 waves, every client a requester) timed in the "
            "ServerApp; local_pipeline_s: the same F + gate + expert forward passes (+ "
            "familiarity for a gate that asks it) + combine for every client, one process, "
            f"{cfg.torch_threads} torch thread(s) (the clients' setting), models in memory; "
            f"all_cores: the same with {cores} torch threads; experts_only: the expert owners' "
            "part alone (forward passes, familiarity).",
            "loads: the splits each requester coalesces into one query (one set of three waves); "
            "'global xR' replays R copies of the global test set per requester, as a queue of R "
            "pending requests served together.",
            "wire bytes (ledger) count array payload plus serialised configs and metrics, both "
            "directions, server relay included (a feature crosses two hops: requester -> server "
            "-> expert owner); peer payloads are sealed end to end.",
        ],
    }
    path = write_result(args.out_dir, NAME, result, started_machine)
    for load, v in per_load.items():
        print(
            f"[inference] {load}: {v['samples']} samples, routed "
            f"{v['routed_samples_per_s']:.0f}/s vs local {v['local_samples_per_s']:.0f}/s = "
            f"{v['routed_over_local']:.4f}x (bar >= {BAR_ROUTED_OVER_LOCAL}); agreement "
            f"{v['prediction_agreement']:.4f}; {v['wire_bytes_per_sample_ledger']:.0f} B/sample "
            f"on the wire vs {local.raw_bytes_per_sample} B raw",
            flush=True,
        )
    print(path)


if __name__ == "__main__":
    main()
