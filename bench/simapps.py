"""Flower pieces of the benchmarks; Ray workers import this module (bench/ is on PYTHONPATH).

- `make_fedavg_server` + `fedavg_client_app`: a minimal ServerApp/ClientApp pair doing stage-1
  FedCE FedAvg only, with the project's `train_extractor`, wire contract (`ExtractorRequest` ->
  `ExtractorReply`), byte-counting grid (`CountingGrid`) and `SharedKeyStrategy`, tracing every
  round.
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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from nmoe.data import load_client_data
from nmoe.models import build_bundle, load_numpy, stage1_keys, state_numpy
from nmoe.training import train_extractor
from nmoe_protocol.messages import ExtractorReply, ExtractorRequest
from nmoe_strategy.comm import CommLedger, CountingGrid
from nmoe_strategy.router import replies_by_node
from nmoe_strategy.strategy import SharedKeyStrategy

STAGE1_METHOD = "fedce"
STAGE1_ACTION = ExtractorRequest.TYPE.split(".", 1)[1]  # the ClientApp's train.<action>
# Records the bench adds beside the wire contract's: the work (down), the client's timing (up).
WORK_RECORD, TIMING_RECORD = "bench-work", "bench-timing"
NODE_POLL_S = 0.1
NODES_TIMEOUT_S = 600.0  # the nodes never came (e.g. Ray failed to start): stop, do not hang
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
    poll_interval_s: float  # how often the server polls for replies (cfg.poll_interval_s)

    def config_record(self) -> ConfigRecord:
        return ConfigRecord({"work": json.dumps(asdict(self))})

    @classmethod
    def from_content(cls, content: RecordDict) -> Stage1Work:
        values = json.loads(str(content[WORK_RECORD]["work"]))
        values["image_shape"] = tuple(values["image_shape"])
        return cls(**values)

    def bundle(self) -> torch.nn.Module:
        return build_bundle(
            SimpleNamespace(**self.model), self.image_shape, self.num_classes, self.seed
        )

    def shared(self, bundle: torch.nn.Module) -> dict[str, np.ndarray]:
        """A copy of the parameters stage 1 trains and shares (FedCE: F and the head)."""
        keys = stage1_keys(bundle, STAGE1_METHOD)
        return {k: v.copy() for k, v in state_numpy(bundle).items() if k in keys}


def local_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Seed of one client's local update in one round (same in Flower and in the plain loop)."""
    return seed * SEED_STRIDE_RUN + partition_id * SEED_STRIDE_CLIENT + server_round


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


def without(content: RecordDict, name: str) -> RecordDict:
    """`content` minus the record `name` (what remains is a message of the wire contract)."""
    return RecordDict({key: record for key, record in content.items() if key != name})


def make_fedavg_server(work: Stage1Work, trace: FedAvgTrace) -> ServerApp:
    """A ServerApp running `work.rounds` FedAvg rounds of stage 1 with `fedavg_client_app`,
    filling `trace`: the project's wire contract, byte-counting grid and `SharedKeyStrategy`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        trace.main_started = time.time()
        torch.set_num_threads(1)
        while len(list(grid.get_node_ids())) < work.num_clients:
            if time.time() - trace.main_started > NODES_TIMEOUT_S:
                raise RuntimeError(f"fewer than {work.num_clients} nodes after {NODES_TIMEOUT_S} s")
            time.sleep(NODE_POLL_S)
        node_ids = sorted(grid.get_node_ids())
        trace.nodes_ready = time.time()
        ledger = CommLedger()
        counting = CountingGrid(grid, ledger, poll_interval_s=work.poll_interval_s)
        counting.stage = STAGE1_METHOD
        strategy = SharedKeyStrategy()
        params = work.shared(work.bundle())
        keys = sorted(params)
        for rnd in range(1, work.rounds + 1):
            started = time.time()
            request = ExtractorRequest(method=STAGE1_METHOD, server_round=rnd, params=params)
            messages = []
            for node in node_ids:  # one content per message, as `nmoe_strategy.router.exchange`
                content = request.to_content()
                content[WORK_RECORD] = work.config_record()
                messages.append(Message(content, dst_node_id=node, message_type=request.TYPE))
            sent = time.time()
            replies_in = counting.send_and_receive(messages, ROUND_TIMEOUT_S)
            by_node = replies_by_node(messages, replies_in)
            received = time.time()
            failed = [r.error.reason for r in by_node.values() if r.has_error()]
            if failed or len(by_node) != len(node_ids):
                raise RuntimeError(f"round {rnd}: {len(by_node)} replies, errors {failed}")
            replies, timings = {}, {}
            for reply in by_node.values():
                timing = dict(reply.content[TIMING_RECORD])
                pid = int(timing[PARTITION_ID_KEY])
                decoded = ExtractorReply.from_content(without(reply.content, TIMING_RECORD))
                replies[pid], timings[pid] = (reply, decoded), timing
            ordered = dict(sorted(replies.items()))  # aggregated in partition order, as plain
            outcome = strategy.aggregate(rnd, ordered, keys, params)
            if outcome.params is None or outcome.rejected:
                raise RuntimeError(f"round {rnd}: replies refused: {outcome.rejected}")
            params = outcome.params
            trace.rounds.append(
                {
                    "round": rnd,
                    "started": started,
                    "sent": sent,
                    "received": received,
                    "aggregated": time.time(),
                    "clients": [timings[pid] for pid in sorted(timings)],
                }
            )
        trace.final = params
        trace.comm_bytes = ledger.as_dict()
        trace.main_finished = time.time()

    return server_app


# Module level, so Ray workers import the handler by reference (the work arrives in each message).
fedavg_client_app = ClientApp()


@fedavg_client_app.train(STAGE1_ACTION)
def train_stage1(msg: Message, context: Context) -> Message:
    """One local stage-1 update; replies with the weights (`ExtractorReply`) and a record of its
    compute time and wall/CPU timestamps."""
    handler_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(1)
    received = Stage1Work.from_content(msg.content)
    request = ExtractorRequest.from_content(without(msg.content, WORK_RECORD))
    pid = int(context.node_config[PARTITION_ID_KEY])
    data, _ = load_client_data(received.spec_json, pid, received.num_clients)
    bundle = received.bundle()
    load_numpy(bundle, request.params, expected=stage1_keys(bundle, request.method))
    compute_start = time.perf_counter()
    loss = local_update(received, bundle, data.train_x, data.train_y, pid, request.server_round)
    compute_s = time.perf_counter() - compute_start
    reply = ExtractorReply(
        params=received.shared(bundle), num_examples=len(data.train_y), loss=loss, ce_loss=loss
    )
    content = reply.to_content()
    content[TIMING_RECORD] = MetricRecord(
        {
            PARTITION_ID_KEY: pid,
            "compute-s": compute_s,
            "handler-start": handler_start,
            "handler-end": time.time(),
            "handler-cpu-s": time.process_time() - cpu_start,
            "worker-pid": os.getpid(),
        }
    )
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------- the real app, wrapped
class TracingClientApp(ClientApp):
    """The project's ClientApp, unchanged, on virtual nodes that have a `state-dir` node config
    (personal state saved to disk as on a deployed SuperNode) and the `node_config` entries given;
    each message's handler time is appended as one JSON line to `trace_path`."""

    def __init__(
        self,
        inner: ClientApp,
        state_dir: str,
        trace_path: str,
        node_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.state_dir = state_dir
        self.trace_path = trace_path
        self.node_config = dict(node_config or {})  # what each node's owner sets beside it

    def __call__(self, message: Message, context: Context) -> Message:
        context.node_config[STATE_DIR_KEY] = self.state_dir
        context.node_config.update(self.node_config)
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
    """A Grid that records (message types, messages, start, end) of every wave: from the push
    of its messages to the pull that delivered the last reply (or the last pull, if some never
    came)."""

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
