"""Peer inference relayed by the ServerApp in three batched waves, and the node directory.

Flower has no client-to-client channel: the server forwards feature batches
(never raw inputs) from requesters to expert owners and logits back.
Wave 1 `query.route`: requesters compute features and gate weights, and return
one feature batch per chosen remote expert. Wave 2 `query.expert`: each owner
gets all batches addressed to it in one message and returns logits. Wave 3
`query.combine`: requesters get the logits (and which experts failed) and combine.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from .comm import CountingGrid

TO_PREFIX = "to_"
FROM_PREFIX = "from_"
EXPERT_PREFIX = "exp_"
NODE_POLL_S = 1.0


def replies_by_node(sent: list[Message], replies: list[Message]) -> dict[int, Message]:
    """Map each reply to the node its request went to (via reply_to_message_id)."""
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out: dict[int, Message] = {}
    for reply in replies:
        node = dst_of.get(reply.metadata.reply_to_message_id)
        if node is not None:
            out[node] = reply
    return out


@dataclass
class NodeDirectory:
    """Partition id <-> node id, plus what each node reported about itself."""

    node_of: dict[int, int] = field(default_factory=dict)
    info: dict[int, dict[str, Any]] = field(default_factory=dict)
    num_partitions: int = 0

    @property
    def partition_ids(self) -> list[int]:
        return sorted(self.node_of)

    def pid_of(self, node_id: int) -> int:
        for pid, nid in self.node_of.items():
            if nid == node_id:
                return pid
        raise KeyError(f"node {node_id} is not in the directory")

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_of": {str(k): v for k, v in self.node_of.items()},
            "info": {str(k): v for k, v in self.info.items()},
            "num_partitions": self.num_partitions,
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> NodeDirectory:
        return cls(
            {int(k): int(v) for k, v in saved["node_of"].items()},
            {int(k): v for k, v in saved["info"].items()},
            int(saved["num_partitions"]),
        )


def discover(
    grid: CountingGrid, config: ConfigRecord, min_nodes: int, timeout: float
) -> NodeDirectory:
    """Ask every connected node who it is (`query.info`) until all partitions are present."""
    deadline = time.monotonic() + timeout
    directory = NodeDirectory()
    while True:
        node_ids = [n for n in grid.get_node_ids() if n not in directory.node_of.values()]
        if node_ids and len(directory.node_of) + len(node_ids) >= min_nodes:
            sent = [
                Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.info")
                for n in node_ids
            ]
            replies = grid.send_and_receive(sent, timeout=timeout)
            for node_id, reply in replies_by_node(sent, replies).items():
                if reply.has_error():
                    log(
                        WARNING,
                        "node %d did not answer query.info: %s",
                        node_id,
                        reply.error.reason,
                    )
                    continue
                info = dict(reply.content["metrics"])
                pid = int(info["partition-id"])
                if pid in directory.node_of:
                    raise RuntimeError(f"two nodes claim partition-id {pid}")
                directory.node_of[pid] = node_id
                directory.info[pid] = info
                directory.num_partitions = int(info["num-partitions"])
        if directory.num_partitions and len(directory.node_of) >= directory.num_partitions:
            break
        if time.monotonic() > deadline:
            if len(directory.node_of) >= min_nodes:
                log(
                    WARNING,
                    "only %d of %d partitions connected; continuing",
                    len(directory.node_of),
                    directory.num_partitions,
                )
                break
            raise TimeoutError(
                f"only {len(directory.node_of)} nodes connected within {timeout}s (min_nodes={min_nodes})"
            )
        time.sleep(NODE_POLL_S)
    log(
        INFO, "Node directory: %d partitions -> nodes %s", len(directory.node_of), directory.node_of
    )
    return directory


@dataclass
class WaveReport:
    """Outcome of one routed query: per-requester metrics and the experts that failed."""

    metrics: dict[int, MetricRecord]
    failed_experts: list[int]
    failed_requesters: list[int]


class Router:
    """Runs the three inference waves for a set of requesters."""

    def __init__(self, grid: CountingGrid, directory: NodeDirectory, timeout: float) -> None:
        self.grid = grid
        self.directory = directory
        self.timeout = timeout

    def _send(self, contents: dict[int, RecordDict], message_type: str) -> dict[int, Message]:
        sent = [
            Message(content, dst_node_id=self.directory.node_of[pid], message_type=message_type)
            for pid, content in contents.items()
        ]
        by_node = replies_by_node(sent, self.grid.send_and_receive(sent, timeout=self.timeout))
        return {self.directory.pid_of(node): reply for node, reply in by_node.items()}

    def run(self, configs: dict[int, ConfigRecord]) -> WaveReport:
        """One routed query per requester pid; `configs[pid]` says what to answer."""
        failed_requesters: set[int] = set()
        # Wave 1: route
        routed = self._send(
            {pid: RecordDict({"config": cfg}) for pid, cfg in configs.items()}, "query.route"
        )
        outbox: dict[int, dict[str, Any]] = defaultdict(dict)  # expert pid -> {from_<i>: features}
        asked: dict[int, list[int]] = {}
        for pid in configs:
            reply = routed.get(pid)
            if reply is None or reply.has_error():
                log(
                    WARNING,
                    "requester %d failed in wave 1: %s",
                    pid,
                    reply.error.reason if reply else "no reply",
                )
                failed_requesters.add(pid)
                continue
            features = reply.content["features"]
            asked[pid] = []
            for key in features:
                expert = int(key[len(TO_PREFIX) :])
                outbox[expert][f"{FROM_PREFIX}{pid}"] = features[key]
                asked[pid].append(expert)
        # Wave 2: expert
        reachable_owners = {e: batch for e, batch in outbox.items() if e in self.directory.node_of}
        answered = (
            self._send(
                {
                    e: RecordDict({"features": ArrayRecord(batch)})
                    for e, batch in reachable_owners.items()
                },
                "query.expert",
            )
            if reachable_owners
            else {}
        )
        failed_experts = sorted(e for e in outbox if e not in answered or answered[e].has_error())
        for e in failed_experts:
            reason = (
                answered[e].error.reason if e in answered else "no reply (timeout or unknown node)"
            )
            log(WARNING, "expert %d failed in wave 2: %s", e, reason)
        # Wave 3: combine
        combine_contents: dict[int, RecordDict] = {}
        for pid, experts in asked.items():
            logits = ArrayRecord()
            for e in experts:
                if e not in failed_experts:
                    logits[f"{EXPERT_PREFIX}{e}"] = answered[e].content["logits"][
                        f"{FROM_PREFIX}{pid}"
                    ]
            failed = [e for e in experts if e in failed_experts]
            combine_config = ConfigRecord(dict(configs[pid]))
            combine_config["failed"] = ",".join(str(e) for e in failed)
            combine_contents[pid] = RecordDict({"logits": logits, "config": combine_config})
        combined = self._send(combine_contents, "query.combine") if combine_contents else {}
        metrics: dict[int, MetricRecord] = {}
        for pid in asked:
            reply = combined.get(pid)
            if reply is None or reply.has_error():
                log(
                    WARNING,
                    "requester %d failed in wave 3: %s",
                    pid,
                    reply.error.reason if reply else "no reply",
                )
                failed_requesters.add(pid)
                continue
            metrics[pid] = reply.content["metrics"]
        return WaveReport(metrics, failed_experts, sorted(failed_requesters))
