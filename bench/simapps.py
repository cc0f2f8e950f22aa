"""Flower pieces of the benchmarks; Ray workers import this module (bench/ is on PYTHONPATH).

- `make_fedavg_server` + `fedavg_client_app`: a minimal ServerApp/ClientApp pair doing stage-1 FedCE FedAvg only,
  with the project's `train_extractor` and `NMoEStrategy`, tracing every round.
- `local_seed` / `average_weighted`: shared with the plain-PyTorch loop, so both do the
  same local updates and the same weighted averaging (replies ordered by partition id).
- `TracingClientApp`: wraps the project's ClientApp unchanged; gives each virtual node a
  `state-dir` (as a deployed SuperNode has) and logs the wall/CPU time of every message.
- `TimingGrid`: wraps the ServerApp's Grid and times every wave (push to last reply).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from nmoe.data import load_client_data
from nmoe.models import build_bundle, load_numpy, state_numpy
from nmoe.training import train_extractor
from nmoe_strategy.comm import CommLedger
from nmoe_strategy.strategy import NMoEStrategy

STAGE1_ACTION = "fe_ce"
STAGE1_METHOD = "fedce"
NODE_POLL_S = 0.1
ROUND_TIMEOUT_S = 3600.0
SEED_STRIDE_CLIENT = 7919
SEED_STRIDE_RUN = 1_000_003
STATE_DIR_KEY = "state-dir"
PARTITION_ID_KEY = "partition-id"


# ---------------------------------------------------------------------------- stage-1 work
@dataclass(frozen=True)
class Stage1Work:
    """Everything that fixes the stage-1 training work, identical for Flower and plain torch."""

    spec_json: str  # nmoe.data.federation_spec(cfg): dataset, partition, seed
    model: dict[str, Any]  # cfg.model as a plain dict
    image_shape: tuple[int, ...]
    num_classes: int
    num_clients: int
    rounds: int
    local_epochs: int
    lr: float
    momentum: float
    batch_size: int
    seed: int

    def config_record(self) -> ConfigRecord:
        return ConfigRecord({"work": json.dumps(asdict(self))})

    @classmethod
    def from_message(cls, msg: Message) -> Stage1Work:
        values = json.loads(str(msg.content["config"]["work"]))
        values["image_shape"] = tuple(values["image_shape"])
        return cls(**values)

    def bundle(self) -> torch.nn.Module:
        return build_bundle(
            SimpleNamespace(**self.model), self.image_shape, self.num_classes, self.seed
        )


def local_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Seed of one client's local update in one round (same in Flower and in the plain loop)."""
    return seed * SEED_STRIDE_RUN + partition_id * SEED_STRIDE_CLIENT + server_round


def snapshot(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A copy of a module's parameters (`state_numpy` returns views that training would change)."""
    return {k: v.copy() for k, v in state_numpy(module).items()}


def average_weighted(
    states: list[dict[str, np.ndarray]], weights: list[float]
) -> dict[str, np.ndarray]:
    """Weighted mean, written like Flower's `aggregate_arrayrecords` (float32, same order)."""
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for state, weight in zip(states, weights, strict=True):
        factor = weight / total
        for key, value in state.items():
            if key not in out:
                out[key] = value * factor
            else:
                out[key] += value * factor
    return out


def local_update(
    work: Stage1Work,
    bundle: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    partition_id: int,
    server_round: int,
) -> float:
    """One client's stage-1 FedCE update, in place; returns the mean training loss."""
    result = train_extractor(
        bundle,
        x,
        y,
        method=STAGE1_METHOD,
        epochs=work.local_epochs,
        lr=work.lr,
        momentum=work.momentum,
        batch_size=work.batch_size,
        seed=local_seed(work.seed, partition_id, server_round),
    )
    return result.loss


# ---------------------------------------------------------------------------- minimal Flower pair
@dataclass
class FedAvgTrace:
    """What the minimal ServerApp measured (wall-clock times are `time.time()` seconds)."""

    main_started: float = 0.0
    nodes_ready: float = 0.0
    main_finished: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, np.ndarray] = field(default_factory=dict)
    comm_bytes: dict[str, dict[str, int]] = field(default_factory=dict)


def make_fedavg_server(work: Stage1Work, trace: FedAvgTrace) -> ServerApp:
    """A ServerApp running `work.rounds` FedAvg rounds of stage 1 with `fedavg_client_app`, filling `trace`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        trace.main_started = time.time()
        torch.set_num_threads(1)
        while len(list(grid.get_node_ids())) < work.num_clients:
            time.sleep(NODE_POLL_S)
        node_ids = sorted(grid.get_node_ids())
        trace.nodes_ready = time.time()
        ledger = CommLedger()
        strategy = NMoEStrategy(ledger)
        arrays = ArrayRecord({k: Array(v) for k, v in state_numpy(work.bundle()).items()})
        keys = sorted(arrays.keys())
        for rnd in range(1, work.rounds + 1):
            started = time.time()
            messages = strategy.configure_stage(
                STAGE1_ACTION, rnd, arrays, work.config_record(), node_ids
            )
            sent = time.time()
            replies = list(grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S))
            received = time.time()
            failed = [r for r in replies if r.has_error()]
            if failed or len(replies) != len(node_ids):
                raise RuntimeError(
                    f"round {rnd}: {len(replies)} replies, errors {[r.error.reason for r in failed]}"
                )
            ordered = sorted(replies, key=lambda r: int(r.content["metrics"][PARTITION_ID_KEY]))
            aggregated, _ = strategy.aggregate_shared(rnd, ordered, keys)
            assert aggregated is not None
            arrays = aggregated
            trace.rounds.append(
                {
                    "round": rnd,
                    "started": started,
                    "sent": sent,
                    "received": received,
                    "aggregated": time.time(),
                    "clients": [dict(r.content["metrics"]) for r in ordered],
                }
            )
        trace.final = {k: v.numpy() for k, v in arrays.items()}
        trace.comm_bytes = ledger.as_dict()
        trace.main_finished = time.time()

    return server_app


# Module level, so Ray workers import the handler by reference (the work arrives in each message).
fedavg_client_app = ClientApp()


@fedavg_client_app.train(STAGE1_ACTION)
def train_stage1(msg: Message, context: Context) -> Message:
    """One local stage-1 update; reports its compute time and wall/CPU timestamps with the weights."""
    handler_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(1)
    received = Stage1Work.from_message(msg)
    pid = int(context.node_config[PARTITION_ID_KEY])
    data, _ = load_client_data(received.spec_json, pid, received.num_clients)
    bundle = received.bundle()
    load_numpy(bundle, {k: v.numpy() for k, v in msg.content["arrays"].items()})
    compute_start = time.perf_counter()
    loss = local_update(
        received,
        bundle,
        data.train_x,
        data.train_y,
        pid,
        int(msg.content["config"]["server-round"]),
    )
    compute_s = time.perf_counter() - compute_start
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in state_numpy(bundle).items()}),
            "metrics": MetricRecord(
                {
                    "num-examples": len(data.train_y),
                    "loss": loss,
                    PARTITION_ID_KEY: pid,
                    "compute-s": compute_s,
                    "handler-start": handler_start,
                    "handler-end": time.time(),
                    "handler-cpu-s": time.process_time() - cpu_start,
                    "worker-pid": os.getpid(),
                }
            ),
        }
    )
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------- wrappers of the real app
class TracingClientApp(ClientApp):
    """The project's ClientApp, unchanged, on virtual nodes that have a `state-dir` node config
    (personal state saved to disk as on a deployed SuperNode); each message's handler time is
    appended as one JSON line to `trace_path`."""

    def __init__(self, inner: ClientApp, state_dir: str, trace_path: str) -> None:
        super().__init__()
        self.inner = inner
        self.state_dir = state_dir
        self.trace_path = trace_path

    def __call__(self, message: Message, context: Context) -> Message:
        context.node_config[STATE_DIR_KEY] = self.state_dir
        start, cpu_start = time.time(), time.process_time()
        reply = self.inner(message, context)
        row = {
            "type": message.metadata.message_type,
            "partition": int(context.node_config[PARTITION_ID_KEY]),
            "start": start,
            "end": time.time(),
            "cpu_s": time.process_time() - cpu_start,
            "worker_pid": os.getpid(),
        }
        with open(self.trace_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return reply


class TimingGrid:
    """A Grid that records (message types, messages, start, end) of every wave: from the push of
    its messages to the pull that delivered the last reply (or the last pull, if some never came)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.calls: list[dict[str, Any]] = []
        self._pending: dict[int, set[str]] = {}  # index in calls -> message ids still unanswered

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        start = time.time()
        ids = list(self.grid.push_messages(messages))
        types = sorted({m.metadata.message_type for m in messages})
        self._pending[len(self.calls)] = set(ids)
        self.calls.append(
            {"type": ",".join(types), "messages": len(messages), "start": start, "end": start}
        )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        now, answered = time.time(), {r.metadata.reply_to_message_id for r in replies}
        for index, pending in list(self._pending.items()):
            self.calls[index]["end"] = now
            pending -= answered
            if not pending:
                del self._pending[index]
        return replies


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a `TracingClientApp` wrote."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
