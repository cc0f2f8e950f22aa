"""The three training stages, the baselines and the evaluation, driven from the ServerApp."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from omegaconf import DictConfig

from nmoe import topology
from nmoe.config import to_dict
from nmoe.data import federation_spec, load_all_clients, num_classes
from nmoe.models import build_bundle, build_expert, build_gate, load_numpy, stage1_keys, state_numpy
from nmoe.protocol import CORR_KEY, FE_ACTION, GATES, SEGMENT_METRICS, TRAINABLE_GATES, sync_due
from nmoe.results import Results
from nmoe.training import accuracy, forward_batched, linear_probe, train_classifier, train_extractor
from nmoe_strategy.comm import CommLedger, CountingGrid
from nmoe_strategy.router import NodeDirectory, Router, discover, replies_by_node
from nmoe_strategy.strategy import NMoEStrategy

from . import checkpoint
from .checkpoint import Checkpoint


class StageFailed(RuntimeError):
    """A stage could not get enough replies after its retries."""


@dataclass
class Progress:
    """Per-round log lines with time per round and an estimate of the time left."""

    level: str
    started: dict[str, float] = field(default_factory=dict)
    first_round: dict[str, int] = field(default_factory=dict)

    def start(self, stage: str) -> None:
        self.started[stage] = time.monotonic()
        if self.level != "quiet":
            log(INFO, "[%s] started", stage)

    def round(self, stage: str, rnd: int, total: int, metrics: dict[str, Any]) -> None:
        elapsed = time.monotonic() - self.started[stage]
        per_round = elapsed / (rnd - self.first_round.setdefault(stage, rnd) + 1)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if self.level != "quiet":
            log(
                INFO,
                "[%s] round %d/%d | %s | %.2fs/round | ETA %.1fs",
                stage,
                rnd,
                total,
                shown,
                per_round,
                per_round * (total - rnd),
            )

    def clients(self, stage: str, rnd: int, per_client: dict[int, dict[str, Any]]) -> None:
        """Verbose level: one line per client with its own metrics."""
        if self.level == "verbose":
            for pid, metrics in sorted(per_client.items()):
                shown = " | ".join(
                    f"{k} {float(v):.4f}" for k, v in metrics.items() if isinstance(v, (int, float))
                )
                log(INFO, "[%s] round %d client %d | %s", stage, rnd, pid, shown)

    def done(self, stage: str) -> float:
        elapsed = time.monotonic() - self.started[stage]
        log(INFO, "[%s] done in %.1fs", stage, elapsed)
        return elapsed


@dataclass
class Run:
    """Everything the stages share: config, grid, strategy, router, results."""

    cfg: DictConfig
    grid: CountingGrid
    strategy: NMoEStrategy
    directory: NodeDirectory
    router: Router
    results: Results
    neighbours: list[list[int]]
    output_dir: Path
    progress: Progress
    num_classes: int
    image_shape: tuple[int, ...]
    checkpoint: Checkpoint

    @property
    def cfg_json(self) -> str:
        return json.dumps(to_dict(self.cfg), sort_keys=True)

    @property
    def pids(self) -> list[int]:
        return self.directory.partition_ids

    @property
    def num_experts(self) -> int:
        return self.directory.num_partitions + (1 if self.cfg.expert.shared_expert else 0)

    def config(self, **values: Any) -> ConfigRecord:
        record = ConfigRecord({"nmoe": self.cfg_json})
        for key, value in values.items():
            record[key] = value
        return record

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        """Run one stage: time it, count its bytes, then write results.json and a checkpoint."""
        self.grid.stage = stage
        self.progress.start(stage)
        try:
            out = fn()
        finally:  # a failed stage keeps its time and bytes up to the failure
            self.results.data["wall_time_s"][stage] = round(self.progress.done(stage), 3)
            self.results.data["comm_bytes"] = self.strategy.ledger.as_dict()
        self.results.write(self.output_dir)
        if stage not in self.checkpoint.completed:
            self.checkpoint.completed.append(stage)
        self.checkpoint.in_progress = {}
        self.checkpoint.arrays.pop(f"{stage}:partial", None)
        if isinstance(out, ArrayRecord):
            self.checkpoint.arrays[stage] = out
        self.save_checkpoint()
        return out

    def save_checkpoint(self) -> None:
        self.checkpoint.results = self.results.data
        self.checkpoint.ledger = self.strategy.ledger.as_dict()
        checkpoint.save(self.output_dir, self.checkpoint)

    def resumable(self, stage: str, fn: Callable[[], Any]) -> Any:
        """`timed`, unless a resumed checkpoint already completed this server-side stage."""
        if stage in self.checkpoint.completed:
            log(INFO, "[%s] restored from checkpoint", stage)
            return self.checkpoint.arrays.get(stage)
        return self.timed(stage, fn)

    def clients_hold(self, group: str) -> bool:
        """Whether every client reported holding personal state `group` (after a resume)."""
        return all(int(self.directory.info[p].get(f"has:{group}", 0)) for p in self.pids)


def open_run(grid: Any, cfg: DictConfig, output_dir: Path) -> Run:
    """Discover the nodes and set up the strategy, router and results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ledger = CommLedger()
    audit = output_dir / "messages.jsonl" if cfg.audit_messages else None
    if audit is not None:
        audit.unlink(missing_ok=True)
    counting = CountingGrid(grid, ledger, audit, float(cfg.poll_interval_s))
    results = Results(to_dict(cfg))
    cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
    timeout = float(cfg.round_timeout_s)
    directory = discover(counting, ConfigRecord({"nmoe": cfg_json}), int(cfg.min_nodes), timeout)
    n = directory.num_partitions
    spec = federation_spec(cfg)
    shape = tuple(load_all_clients(spec, n)[0].train_x.shape[1:])
    neighbours = topology.neighbour_sets(cfg.topology, n, int(cfg.seed))
    results.data["topology"] = topology.describe(cfg.topology, n, int(cfg.seed))
    results.data["topology"]["neighbours"] = neighbours
    results.data["nodes"] = directory.to_dict()
    for pid, nb in enumerate(neighbours):
        if int(cfg.gate.k) > len(nb) + (1 if cfg.expert.shared_expert else 0):
            raise ValueError(
                f"config key 'gate.k': k={cfg.gate.k} exceeds client {pid}'s neighbourhood ({len(nb)} experts)"
            )
    strategy = NMoEStrategy(ledger, float(cfg.min_reply_fraction))
    saved = checkpoint.Checkpoint()
    if cfg.resume:
        saved = checkpoint.load(str(cfg.resume))
        results.data.update(
            {k: v for k, v in saved.results.items() if k not in ("config", "nodes")}
        )
        ledger.load(saved.ledger)
        log(
            INFO,
            "Resuming from %s: completed %s, in progress %s",
            cfg.resume,
            saved.completed,
            saved.in_progress,
        )
    return Run(
        cfg,
        counting,
        strategy,
        directory,
        Router(counting, directory, timeout),
        results,
        neighbours,
        output_dir,
        Progress(str(cfg.log_level)),
        num_classes(spec, n),
        shape,
        saved,
    )


# ---------------------------------------------------------------------------- federated rounds
def federated_rounds(
    run: Run,
    stage: str,
    action: str,
    arrays: ArrayRecord,
    rounds: int,
    shared_keys: Callable[[int], list[str]],
    extra: Callable[[int], dict[str, Any]] = lambda r: {},
    peer_arrays: Callable[[dict[int, Message]], dict[int, ArrayRecord]] | None = None,
    on_round: Callable[[int, ArrayRecord], dict[str, Any]] | None = None,
    outgoing: Callable[[int, ArrayRecord], ArrayRecord] = lambda r, current: current,
    checkpoint_rounds: bool = False,
) -> ArrayRecord:
    """`rounds` rounds of `train.<action>`: send, retry if too few replies, aggregate shared keys.

    `arrays` holds the server's copy of every key; `outgoing` picks what a round sends.
    With `checkpoint_rounds` (server-side state only) every round is checkpointed and a
    resumed run continues after the last completed round.
    """
    if stage not in run.progress.started:  # a sub-stage, e.g. shared_expert inside expert
        run.progress.start(stage)
    peers: dict[int, ArrayRecord] = {}
    first = 1
    if checkpoint_rounds and run.checkpoint.round_done(stage):
        first = run.checkpoint.round_done(stage) + 1
        arrays = run.checkpoint.arrays[f"{stage}:partial"]
        log(INFO, "[%s] resuming after round %d", stage, first - 1)
    for rnd in range(first, rounds + 1):
        keys = shared_keys(rnd)
        for attempt in range(int(run.cfg.round_retries) + 1):
            node_ids = [run.directory.node_of[p] for p in run.pids]
            messages = run.strategy.configure_stage(
                action, rnd, outgoing(rnd, arrays), run.config(**extra(rnd)), node_ids, peers
            )
            replies = run.grid.send_and_receive(messages, timeout=float(run.cfg.round_timeout_s))
            by_node = replies_by_node(messages, replies)
            valid = [r for r in by_node.values() if not r.has_error()]
            dropped = [
                run.directory.pid_of(n)
                for n in node_ids
                if n not in by_node or by_node[n].has_error()
            ]
            if dropped:
                run.results.data["extra"].setdefault("dropped", []).append(
                    {"stage": stage, "round": rnd, "clients": dropped}
                )
                log(WARNING, "[%s] round %d: clients %s failed or timed out", stage, rnd, dropped)
            if run.strategy.enough_replies(len(valid), len(messages)):
                break
            log(
                WARNING,
                "[%s] round %d: %d/%d replies (< %.0f%%), attempt %d",
                stage,
                rnd,
                len(valid),
                len(messages),
                100 * run.strategy.min_reply_fraction,
                attempt + 1,
            )
        else:
            raise StageFailed(
                f"stage '{stage}' round {rnd}: too few replies after {run.cfg.round_retries} retries"
            )
        aggregated, metrics = run.strategy.aggregate_shared(rnd, valid, keys)
        if aggregated is not None:
            merged = ArrayRecord({k: v for k, v in arrays.items()})
            for key in keys:
                merged[key] = aggregated[key]
            arrays = merged
        if peer_arrays is not None:
            peers = peer_arrays(
                {run.directory.pid_of(n): r for n, r in by_node.items() if not r.has_error()}
            )
        row = {
            k: float(v)
            for k, v in (metrics or MetricRecord()).items()
            if isinstance(v, (int, float))
        }
        if on_round is not None:
            row.update(on_round(rnd, arrays))
        run.results.log_round(stage=stage, round=rnd, replies=len(valid), **row)
        run.progress.round(stage, rnd, rounds, row)
        run.progress.clients(
            stage,
            rnd,
            {
                run.directory.pid_of(n): dict(r.content["metrics"])
                for n, r in by_node.items()
                if not r.has_error()
            },
        )
        if checkpoint_rounds:
            run.checkpoint.in_progress = {"stage": stage, "round": rnd}
            run.checkpoint.arrays[f"{stage}:partial"] = arrays
            run.save_checkpoint()
    return arrays


def send_to_all(
    run: Run, message_type: str, content: Callable[[int], RecordDict], pids: list[int] | None = None
) -> dict[int, Message]:
    """One message per client (all, or `pids`); returns the valid replies by partition id and
    records the clients that failed or timed out."""
    node_ids = {p: run.directory.node_of[p] for p in (run.pids if pids is None else pids)}
    messages = [
        Message(content(p), dst_node_id=n, message_type=message_type) for p, n in node_ids.items()
    ]
    by_node = replies_by_node(
        messages, run.grid.send_and_receive(messages, timeout=float(run.cfg.round_timeout_s))
    )
    out = {}
    for pid, node in node_ids.items():
        reply = by_node.get(node)
        if reply is None or reply.has_error():
            log(
                WARNING,
                "%s: client %d failed: %s",
                message_type,
                pid,
                reply.error.reason if reply else "no reply",
            )
            run.results.data["extra"].setdefault("dropped", []).append(
                {"stage": run.grid.stage, "clients": [pid]}
            )
            continue
        out[pid] = reply
    return out


# ---------------------------------------------------------------------------- stage 1
def initial_bundle(run: Run, method: str) -> tuple[ArrayRecord, list[str]]:
    """The seeded stage-1 bundle (every key) and the keys `method` trains and shares."""
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    return ArrayRecord({k: Array(v) for k, v in state_numpy(bundle).items()}), stage1_keys(
        bundle, method
    )


def probe_accuracy(run: Run, arrays: ArrayRecord) -> float:
    """Linear probe of F on the global test set, trained on the pooled client training data
    (an evaluation protocol run by the server; no client data crosses the network)."""
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    load_numpy(bundle, {k: v.numpy() for k, v in arrays.items()})
    clients = load_all_clients(federation_spec(run.cfg), run.directory.num_partitions)
    train_x = np.concatenate([c.train_x.numpy() for c in clients])
    train_y = np.concatenate([c.train_y.numpy() for c in clients])
    feats = forward_batched(bundle.fe, torch.from_numpy(train_x))
    test_feats = forward_batched(bundle.fe, clients[0].global_x)
    return linear_probe(
        feats,
        torch.from_numpy(train_y),
        test_feats,
        clients[0].global_y,
        num_classes=run.num_classes,
        epochs=int(run.cfg.fe.probe_epochs),
        lr=float(run.cfg.expert.lr),
        batch_size=int(run.cfg.expert.batch_size),
        seed=int(run.cfg.seed),
    )


def stage_feature_extractor(run: Run, method: str, stage: str) -> ArrayRecord:
    """Stage 1: FedAvg of the parts the method trains (F + head for FedCE, F + projector for FedSC,
    all for hybrid); the untrained part keeps its seeded initialisation."""
    arrays, shared = initial_bundle(run, method)
    share_corr = bool(run.cfg.fe.share_correlation) and method != "fedce"

    def others_average(replies: dict[int, Message]) -> dict[int, ArrayRecord]:
        corr = {
            pid: r.content["arrays"][CORR_KEY].numpy()
            for pid, r in replies.items()
            if CORR_KEY in r.content["arrays"]
        }
        out = {}
        for pid in corr:
            others = [c for p, c in corr.items() if p != pid]
            if others:
                out[run.directory.node_of[pid]] = ArrayRecord(
                    {"corr": Array(np.mean(others, axis=0).astype(np.float32))}
                )
        return out

    def probe(rnd: int, current: ArrayRecord) -> dict[str, Any]:
        return {"probe-acc": probe_accuracy(run, current)} if method != "fedce" else {}

    return federated_rounds(
        run,
        stage,
        FE_ACTION[method],
        arrays,
        int(run.cfg.fe.rounds),
        lambda r: shared,
        peer_arrays=others_average if share_corr else None,
        on_round=probe,
        outgoing=lambda r, current: ArrayRecord({k: current[k] for k in shared}),
        checkpoint_rounds=True,
    )


# ---------------------------------------------------------------------------- stage 2
def stage_experts(run: Run, bundle: ArrayRecord) -> None:
    """Stage 2: every client trains its own expert on the final F; experts stay on the clients.
    With `expert.init_from_shared` the shared expert is trained first and each personal expert
    starts from it."""
    cfg = run.cfg
    own_head = "shared_fe_own_head" in cfg.baselines
    from_shared = bool(cfg.expert.init_from_shared)
    replies = send_to_all(
        run,
        "train.expert",
        lambda p: RecordDict(
            {
                "arrays": bundle,
                "config": run.config(
                    **{"own-head": own_head, "expert-init": "none" if from_shared else "scratch"}
                ),
            }
        ),
    )
    if cfg.expert.shared_expert:
        expert = build_expert(cfg.model, run.num_classes, int(cfg.seed))
        arrays = ArrayRecord({k: Array(v) for k, v in state_numpy(expert).items()})
        keys = sorted(arrays.keys())
        arrays = federated_rounds(
            run,
            "shared_expert",
            "shared_expert",
            arrays,
            int(cfg.expert.shared_rounds),
            lambda r: keys,
            extra=lambda r: {"install": False},
        )
        send_to_all(
            run,
            "train.shared_expert",
            lambda p: RecordDict(
                {"arrays": arrays, "config": run.config(install=True, **{"server-round": 0})}
            ),
        )
    if from_shared:
        replies = send_to_all(
            run,
            "train.expert",
            lambda p: RecordDict(
                {"config": run.config(**{"own-head": False, "expert-init": "shared"})}
            ),
        )
    accs = {p: float(r.content["metrics"]["test-acc"]) for p, r in replies.items()}
    run.results.log_round(
        stage="expert",
        round=1,
        replies=len(replies),
        **{"test-acc": float(np.mean(list(accs.values())))},
    )


# ---------------------------------------------------------------------------- stage 3
def route_configs(
    run: Run,
    query: str,
    splits: Sequence[str],
    mode: str,
    gate: str,
    seed: int = 0,
    return_predictions: bool = False,
) -> dict[int, ConfigRecord]:
    """One query per client over `splits` (coalesced: one set of waves answers them all)."""
    if isinstance(splits, str):
        raise TypeError(f"splits must be a list of split names, got the string '{splits}'")
    return {
        p: run.config(
            **{
                "query-id": query,
                "split": ",".join(splits),
                "mode": mode,
                "gate": gate,
                "k": int(run.cfg.gate.k),
                "neighbours": ",".join(str(n) for n in run.neighbours[p]),
                "seed": seed,
                "return-predictions": return_predictions,
            }
        )
        for p in run.pids
    }


def fill_gate_cache(run: Run) -> None:
    """Fetch every reachable expert's logits on each client's training features once."""
    report = run.router.run(
        route_configs(run, f"cache-{uuid.uuid4().hex[:8]}", ["gate"], "cache", "cache")
    )
    run.results.data["extra"]["gate_cache"] = {
        "clients": sorted(report.metrics),
        "failed_experts": report.failed_experts,
    }


def fedgate_keys(run: Run, rnd: int, gate_keys: list[str]) -> list[str]:
    """Shared gate keys synchronised in round `rnd` (trunk / head on their own schedules)."""
    trunk = sync_due(rnd, int(run.cfg.gate.sync_trunk_every))
    head = sync_due(rnd, int(run.cfg.gate.sync_head_every))
    return [
        k
        for k in gate_keys
        if (k.startswith("trunk.") and trunk) or (k.startswith("head.") and head)
    ]


def initial_gate(run: Run) -> ArrayRecord:
    gate = build_gate(run.cfg.model, run.num_experts, int(run.cfg.seed))
    return ArrayRecord({k: Array(v) for k, v in state_numpy(gate).items()})


def stage_fedgate(run: Run) -> None:
    """FedGate: local gate training; the server averages only the keys due for sync.

    Round 1 sends the whole initial gate (one init everywhere); round r > 1 sends
    the aggregate of the keys synchronised in round r - 1. Keys never due stay personal.
    """
    initial = initial_gate(run)
    all_keys = sorted(initial.keys())
    rounds = int(run.cfg.gate.rounds)

    def outgoing(rnd: int, current: ArrayRecord) -> ArrayRecord:
        return (
            current
            if rnd == 1
            else ArrayRecord({k: current[k] for k in fedgate_keys(run, rnd - 1, all_keys)})
        )

    final = federated_rounds(
        run,
        "fedgate",
        "gate",
        initial,
        rounds,
        lambda r: fedgate_keys(run, r, all_keys),
        extra=lambda r: {
            "gate": "fedgate",
            "install": False,
            "return-keys": ",".join(fedgate_keys(run, r, all_keys)),
        },
        outgoing=outgoing,
    )
    last_keys = fedgate_keys(run, rounds, all_keys)
    if last_keys:  # push the last aggregate so every client ends with the synchronised part
        send_to_all(
            run,
            "train.gate",
            lambda p: RecordDict(
                {
                    "arrays": ArrayRecord({k: final[k] for k in last_keys}),
                    "config": run.config(
                        gate="fedgate",
                        install=True,
                        **{"return-keys": "", "server-round": rounds + 1},
                    ),
                }
            ),
        )


def stage_rollgate(run: Run) -> None:
    """RollGate: one gate visits the clients in turn, each training it; no averaging."""
    gate = initial_gate(run)
    keys = ",".join(sorted(gate.keys()))
    rng = random.Random(int(run.cfg.seed))
    passes = int(run.cfg.gate.rounds)
    visits: list[list[int]] = []
    for pas in range(1, passes + 1):
        order = list(run.pids)
        if run.cfg.gate.roll_order == "shuffled":
            rng.shuffle(order)
        visits.append(order)
        losses = []
        for step, pid in enumerate(order, start=1):
            config = run.config(
                gate="rollgate",
                install=False,
                **{"return-keys": keys, "server-round": (pas - 1) * len(order) + step},
            )
            content = RecordDict({"arrays": gate, "config": config})
            reply = send_to_all(run, "train.gate", lambda p, c=content: c, [pid])
            if pid not in reply:  # skipped: the gate moves on unchanged
                continue
            gate = ArrayRecord({k: v for k, v in reply[pid].content["arrays"].items()})
            losses.append(float(reply[pid].content["metrics"]["loss"]))
            run.results.log_round(stage="rollgate", round=pas, client=pid, loss=losses[-1])
        run.progress.round(
            "rollgate", pas, passes, {"loss": float(np.mean(losses)) if losses else float("nan")}
        )
    run.results.data["extra"]["rollgate_order"] = visits
    send_to_all(
        run,
        "train.gate",
        lambda p: RecordDict(
            {
                "arrays": gate,
                "config": run.config(
                    gate="rollgate", install=True, **{"return-keys": "", "server-round": 0}
                ),
            }
        ),
    )


# ---------------------------------------------------------------------------- evaluation
def routed_accuracy(run: Run, gate: str, splits: Sequence[str]) -> list[dict[int, dict[str, Any]]]:
    """One routed query per client over all `splits` in one set of waves; per split (in order)
    the clients' metrics. Records latency, failures and (optionally) predictions."""
    record = bool(run.cfg.record_predictions)
    started = time.perf_counter()
    report = run.router.run(
        route_configs(
            run,
            f"{gate}-{uuid.uuid4().hex[:8]}",
            splits,
            "infer",
            gate,
            seed=int(run.cfg.seed),
            return_predictions=record,
        )
    )
    seconds = time.perf_counter() - started
    per_split = [
        {
            p: {name: m[f"{name}.{i}"] for name in SEGMENT_METRICS if f"{name}.{i}" in m}
            for p, m in report.metrics.items()
        }
        for i in range(len(splits))
    ]
    samples = sum(int(m["num-examples"]) for m in report.metrics.values())
    run.results.data.setdefault("inference_latency", {})[gate] = {
        "splits": list(splits),
        "seconds": round(seconds, 4),
        "samples": samples,
        "ms_per_sample": round(1000 * seconds / max(samples, 1), 4),
    }
    if record:
        for split, metrics in zip(splits, per_split, strict=True):
            run.results.data.setdefault("predictions", {}).setdefault(gate, {})[split] = {
                str(p): [int(v) for v in m["predictions"]] for p, m in metrics.items()
            }
    if report.failed_experts or report.failed_requesters:
        run.results.data["extra"].setdefault("inference_failures", []).append(
            {
                "gate": gate,
                "splits": list(splits),
                "failed_experts": report.failed_experts,
                "failed_requesters": report.failed_requesters,
            }
        )
    return per_split


def evaluate_routed(run: Run, gates: list[str], nmoe_gate: str) -> None:
    """Collaborative inference for each gate: local tests and the global test in one set of waves."""
    routing = {}
    for gate in gates:
        local, glob = routed_accuracy(run, gate, ["test", "global"])
        local_acc = {p: float(m["accuracy"]) for p, m in local.items()}
        global_acc = {p: float(m["accuracy"]) for p, m in glob.items()}
        routing[gate] = {str(p): list(m["route-counts"]) for p, m in local.items()}
        for metric in ("degraded", "answered-locally"):
            run.results.data["extra"].setdefault(f"{metric.replace('-', '_')}_queries", {})[
                gate
            ] = {
                split: sum(int(m[metric]) for m in replies.values())
                for split, replies in (("test", local), ("global", glob))
            }
        for name in {gate, "nmoe"} if gate == nmoe_gate else {gate}:
            run.results.set_accuracy(name, local_acc, global_acc)
        log(
            INFO,
            "[evaluate] %s: local %.4f | global %.4f",
            gate,
            np.mean(list(local_acc.values())),
            np.mean(list(global_acc.values())),
        )
    run.results.data["routing_counts"] = routing


def evaluate_local(run: Run, fedavg_bundle: ArrayRecord | None) -> None:
    """Methods answered on each client alone: own expert, F+global head, F+own head."""
    methods = ["local_expert"]
    if "fedavg" in run.cfg.baselines:
        methods.append("fedavg")
    if "shared_fe_own_head" in run.cfg.baselines:
        methods.append("shared_fe_own_head")

    def content(pid: int) -> RecordDict:
        rd = RecordDict({"config": run.config(methods=",".join(methods))})
        if fedavg_bundle is not None:
            rd["fedavg"] = fedavg_bundle
        return rd

    replies = send_to_all(run, "evaluate", content)
    for method in methods:
        local = {p: float(r.content["metrics"][f"acc-local.{method}"]) for p, r in replies.items()}
        glob = {p: float(r.content["metrics"][f"acc-global.{method}"]) for p, r in replies.items()}
        run.results.set_accuracy(method, local, glob)
        log(
            INFO,
            "[evaluate] %s: local %.4f | global %.4f",
            method,
            np.mean(list(local.values())),
            np.mean(list(glob.values())),
        )


def baseline_local_only(run: Run) -> None:
    replies = send_to_all(run, "train.local_only", lambda p: RecordDict({"config": run.config()}))
    run.results.set_accuracy(
        "local_only",
        {p: float(r.content["metrics"]["acc-local"]) for p, r in replies.items()},
        {p: float(r.content["metrics"]["acc-global"]) for p, r in replies.items()},
    )


def baseline_centralized(run: Run) -> None:
    """Upper reference: one F + expert trained on the pooled training data (in the ServerApp)."""
    cfg = run.cfg
    clients = load_all_clients(federation_spec(cfg), run.directory.num_partitions)
    x = torch.cat([c.train_x for c in clients])
    y = torch.cat([c.train_y for c in clients])
    bundle = build_bundle(cfg.model, run.image_shape, run.num_classes, int(cfg.seed))
    epochs = max(1, int(cfg.fe.rounds) * int(cfg.fe.local_epochs))
    train_extractor(
        bundle,
        x,
        y,
        method="fedce",
        epochs=epochs,
        lr=float(cfg.fe.lr),
        momentum=float(cfg.fe.momentum),
        batch_size=int(cfg.fe.batch_size),
        seed=int(cfg.seed),
    )
    expert = build_expert(cfg.model, run.num_classes, int(cfg.seed))
    train_classifier(
        expert,
        forward_batched(bundle.fe, x),
        y,
        epochs=int(cfg.expert.epochs),
        lr=float(cfg.expert.lr),
        batch_size=int(cfg.expert.batch_size),
        seed=int(cfg.seed),
    )
    model = lambda inp: expert(bundle.fe(inp))
    local = {
        pid: accuracy(forward_batched(model, c.test_x), c.test_y) for pid, c in enumerate(clients)
    }
    glob = accuracy(forward_batched(model, clients[0].global_x), clients[0].global_y)
    run.results.set_accuracy("centralized", local, {pid: glob for pid in local})


# ---------------------------------------------------------------------------- the whole run
def run_inference_only(run: Run) -> dict[str, Any]:
    """Collaborative inference with the personal state the clients saved under `state_key`."""
    gate = str(run.cfg.gate.method)
    run.timed("evaluate_local", lambda: evaluate_local(run, None))
    run.timed("inference", lambda: evaluate_routed(run, [gate], gate))
    return run.results.data


def run_all(run: Run) -> dict[str, Any]:
    """Stages 1-3, baselines and evaluation; results.json is rewritten after every stage."""
    cfg = run.cfg
    if cfg.mode == "inference":
        return run_inference_only(run)
    method = str(cfg.fe.method)
    bundle = run.resumable(
        FE_ACTION[method], lambda: stage_feature_extractor(run, method, FE_ACTION[method])
    )
    fedavg_bundle = None
    if (
        "fedavg" in cfg.baselines and method == "fedsc"
    ):  # FedSC trains no head: FedAvg needs its own FedCE run
        fedavg_bundle = run.resumable(
            "baseline_fedavg", lambda: stage_feature_extractor(run, "fedce", "baseline_fedavg")
        )
    # Client-side stages are skipped on resume only if every client still holds their result.
    if not ("expert" in run.checkpoint.completed and run.clients_hold("model/expert")):
        run.timed("expert", lambda: stage_experts(run, bundle))
    nmoe_gate = str(cfg.gate.method)
    gates = [nmoe_gate] + [g for g in GATES if g in cfg.baselines and g != nmoe_gate]
    to_train = [
        g
        for g in gates
        if g in TRAINABLE_GATES
        and not (g in run.checkpoint.completed and run.clients_hold(f"model/gate.{g}"))
    ]
    if to_train:
        run.timed("gate_cache", lambda: fill_gate_cache(run))
    for gate in to_train:
        run.timed(
            gate, lambda gate=gate: stage_fedgate(run) if gate == "fedgate" else stage_rollgate(run)
        )
    if "local_only" in cfg.baselines:
        run.resumable("baseline_local_only", lambda: baseline_local_only(run))
    if "centralized" in cfg.baselines:
        run.resumable("baseline_centralized", lambda: baseline_centralized(run))
    run.timed("evaluate_local", lambda: evaluate_local(run, fedavg_bundle))
    run.timed("inference", lambda: evaluate_routed(run, gates, nmoe_gate))
    run.results.data["comm_bytes"] = run.strategy.ledger.as_dict()
    return run.results.data
