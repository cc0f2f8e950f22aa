"""The run context every stage shares: config, grid, strategy, node directory, router, results,
checkpoint and progress, with `wave` (one message per client, replies decoded) and `stage`
(timed, counted, checkpointed)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common import log
from omegaconf import DictConfig

from nmoe import topology
from nmoe.config import to_dict
from nmoe.datasets import dataset_info
from nmoe.results import Results
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import WireMessage
from nmoe_strategy.comm import CommLedger, CountingGrid
from nmoe_strategy.router import NodeDirectory, Router, decode, discover, exchange
from nmoe_strategy.strategy import SharedKeyStrategy, flower_strategy

from . import checkpoint
from .checkpoint import Checkpoint

Reply = TypeVar("Reply", bound=WireMessage)


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
        if stage not in self.started:
            self.start(stage)
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
    """Everything the stages share."""

    cfg: DictConfig
    grid: CountingGrid
    ledger: CommLedger
    strategy: SharedKeyStrategy
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
    def pids(self) -> list[int]:
        return self.directory.partition_ids

    @property
    def num_experts(self) -> int:
        return self.directory.num_partitions + (1 if self.cfg.expert.shared_expert else 0)

    @property
    def timeout(self) -> float:
        return float(self.cfg.round_timeout_s)

    # --- messaging ---------------------------------------------------------------------
    def wave(
        self, requests: dict[int, WireMessage], reply_type: type[Reply], rnd: int | None = None
    ) -> dict[int, Reply]:
        """One message per client (`requests` by partition id), sent together; the decoded
        replies by partition id. Clients that fail, time out or break the contract are logged
        and recorded as dropped."""
        return {
            pid: reply for pid, (_, reply) in self.wave_messages(requests, reply_type, rnd).items()
        }

    def wave_messages(
        self, requests: dict[int, WireMessage], reply_type: type[Reply], rnd: int | None = None
    ) -> dict[int, tuple[Message, Reply]]:
        """`wave`, keeping each reply's Flower message beside its decoded content."""
        replies = exchange(self.grid, requests, self.directory.node_of, self.timeout)
        out: dict[int, tuple[Message, Reply]] = {}
        dropped = []
        for pid in requests:
            decoded, error = decode(replies.get(pid), reply_type)
            if decoded is None:
                log(WARNING, "[%s] client %d failed: %s", self.grid.stage, pid, error)
                dropped.append(pid)
            else:
                out[pid] = (replies[pid], decoded)
        if dropped:
            self.results.record_dropped(self.grid.stage, dropped, rnd)
        return out

    def broadcast(self, request: WireMessage, reply_type: type[Reply]) -> dict[int, Reply]:
        """The same request to every client."""
        return self.wave({pid: request for pid in self.pids}, reply_type)

    # --- stages ------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], Any], keep: bool = False) -> Any:
        """Run one stage: time it, count its bytes, then write results.json and a checkpoint
        (with `keep`, the parameters `fn` returns, so a resumed run need not redo it)."""
        self.grid.stage = name
        self.progress.start(name)
        try:
            out = fn()
        finally:  # a failed stage keeps its time and bytes up to the failure
            self.results.record_stage(name, self.progress.done(name), self.ledger.as_dict())
        self.results.write(self.output_dir)
        if name not in self.checkpoint.completed:
            self.checkpoint.completed.append(name)
        self.checkpoint.in_progress = {}
        for suffix in ("partial", "best", "momentum"):
            self.checkpoint.arrays.pop(f"{name}:{suffix}", None)
        if keep:
            self.checkpoint.arrays[name] = ArrayRecord({k: Array(v) for k, v in out.items()})
        self.save_checkpoint()
        return out

    def resumable(self, name: str, fn: Callable[[], Any], keep: bool = False) -> Any:
        """`stage`, unless a resumed checkpoint already completed this server-side stage."""
        if name in self.checkpoint.completed:
            log(INFO, "[%s] restored from checkpoint", name)
            saved = self.checkpoint.arrays.get(name)
            return None if saved is None else {k: v.numpy() for k, v in saved.items()}
        return self.stage(name, fn, keep)

    def save_checkpoint(self) -> None:
        self.checkpoint.results = self.results.data
        self.checkpoint.ledger = self.ledger.as_dict()
        checkpoint.save(self.output_dir, self.checkpoint)

    @property
    def simulated(self) -> bool:
        """Whether every node's data is a partition of the configured dataset (a simulation): only
        then may the server read that dataset (centralized reference, pooled probe); a node
        with its own `data-dir` keeps its samples, and the server holds none."""
        return all(info.data_source == "partition" for info in self.directory.info.values())

    def clients_hold(self, group: str) -> bool:
        """Whether every client reported holding personal state `group` (after a resume)."""
        return all(group in self.directory.info[p].holds for p in self.pids)


def open_run(grid: Any, cfg: DictConfig, output_dir: Path) -> Run:
    """Set the run up on every node (discovery), then the strategy, router and results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ledger = CommLedger()
    audit = output_dir / "messages.jsonl" if cfg.audit_messages else None
    if audit is not None:
        audit.unlink(missing_ok=True)
    counting = CountingGrid(grid, ledger, audit, float(cfg.poll_interval_s))
    results = Results(to_dict(cfg))
    timeout = float(cfg.round_timeout_s)
    config_json = json.dumps(to_dict(cfg), sort_keys=True)
    directory = discover(counting, config_json, int(cfg.min_nodes), timeout)
    n = directory.num_partitions
    info = dataset_info(str(cfg.dataset.name))  # the server knows shapes from the config only
    image_shape, num_classes = tuple(info.image_shape), info.num_classes
    for pid, node in sorted(directory.info.items()):
        if (tuple(node.image_shape), node.num_classes) != (image_shape, num_classes):
            log(
                WARNING,
                "node of partition %d holds images %s with %d classes, not %s with %d "
                "(%s): left out of the run",
                pid,
                node.image_shape,
                node.num_classes,
                list(image_shape),
                num_classes,
                info.name,
            )
            directory.remove(pid)
    if len(directory.node_of) < int(cfg.min_nodes):
        raise RuntimeError(
            f"only {len(directory.node_of)} nodes hold {info.name} data (min_nodes={cfg.min_nodes})"
        )
    neighbours = topology.neighbour_sets(cfg.topology, n, int(cfg.seed))
    described = topology.describe(cfg.topology, n, int(cfg.seed))
    results.set("topology", {**described, "neighbours": neighbours})
    results.set("nodes", directory.to_dict())
    for pid, nb in enumerate(neighbours):
        if int(cfg.gate.k) > len(nb) + (1 if cfg.expert.shared_expert else 0):
            raise ValueError(
                f"config key 'gate.k': k={cfg.gate.k} exceeds client {pid}'s neighbourhood "
                f"({len(nb)} experts)"
            )
    inner = flower_strategy(str(cfg.aggregation), float(cfg.aggregation_trim))
    strategy = SharedKeyStrategy(inner, float(cfg.min_reply_fraction))
    saved = Checkpoint()
    if cfg.resume:
        saved = checkpoint.load(str(cfg.resume))
        results.restore(saved.results)
        ledger.load(saved.ledger)
        log(
            INFO,
            "Resuming from %s: completed %s, in progress %s",
            cfg.resume,
            saved.completed,
            saved.in_progress,
        )
    sealed = bool(cfg.seal_payloads)
    if sealed:  # every node pins every peer's public key for the run
        keys = {
            str(pid): np.frombuffer(info.public_key, np.uint8).copy()
            for pid, info in directory.info.items()
        }
        request = wire.InstallRequest(part="peer_keys", params=keys)
        replies = exchange(
            counting, {pid: request for pid in directory.node_of}, directory.node_of, timeout
        )
        for pid in list(directory.node_of):
            if decode(replies.get(pid), wire.Installed)[0] is None:
                log(WARNING, "node of partition %d did not pin its peers' keys: left out", pid)
                directory.remove(pid)
    router = Router(counting, directory, timeout, int(cfg.model.feature_dim), num_classes, sealed)
    return Run(
        cfg,
        counting,
        ledger,
        strategy,
        directory,
        router,
        results,
        neighbours,
        output_dir,
        Progress(str(cfg.log_level)),
        num_classes,
        image_shape,
        saved,
    )
