"""Peer inference relayed by the ServerApp in three batched waves, and the node directory.

Flower has no client-to-client channel: the server forwards feature batches (never raw inputs)
from requesters to expert owners and logits back, one `send_and_receive` per wave for all nodes.
Wave 1 `query.route`: requesters compute features and gate weights and return one feature batch
per chosen remote expert. Wave 2 `query.expert`: each owner gets every batch addressed to it in
one message and returns logits. Wave 3 `query.combine`: requesters get the logits of the experts
that answered (a missing expert failed) and combine. Any reply that breaks the contract (unknown
or missing batches, wrong shapes, non-finite values) counts as a failed node.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import log

from nmoe import gates
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import ProtocolError, WireMessage

from .comm import CountingGrid

NODE_POLL_S = 1.0


def asks_familiarity(request: wire.RouteRequest) -> bool:
    """Whether a routed query's gate wants the experts' familiarity with each row."""
    return (
        request.mode in wire.GATED_MODES
        and request.gate in gates.GATES
        and gates.get(request.gate).asks_familiarity
    )


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
    """Partition id <-> node id, plus what each node reported about itself at set-up."""

    node_of: dict[int, int] = field(default_factory=dict)
    info: dict[int, wire.NodeInfo] = field(default_factory=dict)
    num_partitions: int = 0
    refused: dict[int, str] = field(default_factory=dict)  # node id -> its SETUP_REFUSED reason

    @property
    def partition_ids(self) -> list[int]:
        return sorted(self.node_of)

    def pid_of(self, node_id: int) -> int:
        for pid, nid in self.node_of.items():
            if nid == node_id:
                return pid
        raise KeyError(f"node {node_id} is not in the directory")

    def remove(self, pid: int) -> None:
        """Leave a node out of the run."""
        self.node_of.pop(pid, None)
        self.info.pop(pid, None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_of": {str(k): v for k, v in self.node_of.items()},
            "info": {
                str(k): {f: (v.hex() if isinstance(v, bytes) else v) for f, v in vars(i).items()}
                for k, i in self.info.items()
            },
            "num_partitions": self.num_partitions,
            "refused": {str(k): v for k, v in self.refused.items()},
        }

    def refused_partitions(self) -> set[int]:
        """Partition ids whose nodes refused the set-up (as their refusals name them)."""
        pids = {wire.parse_setup_refusal(reason)[0] for reason in self.refused.values()}
        return {p for p in pids if p is not None and p not in self.node_of}

    def expected_partitions(self) -> int:
        """The federation's size: as answering nodes report it, else as refusals name it."""
        if self.num_partitions:
            return self.num_partitions
        sizes = [wire.parse_setup_refusal(reason)[1] for reason in self.refused.values()]
        return max((n for n in sizes if n is not None), default=0)


def exchange(
    grid: CountingGrid, requests: dict[int, WireMessage], node_of: dict[int, int], timeout: float
) -> dict[int, Message]:
    """One wave: `requests[key]` to node `node_of[key]`; the replies by key (missing: no reply)."""
    sent = {
        key: Message(req.to_content(), dst_node_id=node_of[key], message_type=req.TYPE)
        for key, req in requests.items()
    }
    by_node = replies_by_node(
        list(sent.values()), grid.send_and_receive(list(sent.values()), timeout)
    )
    return {
        key: by_node[m.metadata.dst_node_id]
        for key, m in sent.items()
        if m.metadata.dst_node_id in by_node
    }


def decode(reply: Message | None, reply_type: type[WireMessage]) -> tuple[Any, str | None]:
    """(decoded reply, None) or (None, why it failed)."""
    if reply is None:
        return None, "no reply (timeout or unknown node)"
    try:
        return reply_type.from_message(reply), None
    except ProtocolError as err:
        return None, str(err)


def discover(grid: CountingGrid, config_json: str, min_nodes: int, timeout: float) -> NodeDirectory:
    """Send the run's set-up to every connected node until every partition answered or refused.

    A node that refuses (an error reply with code `SETUP_REFUSED`: its owner's policy or its data
    does not admit the run) is logged, named in the directory's `refused` and never asked again;
    once every partition of the federation answered or refused, discovery ends at once (an error
    naming the refusals if fewer than `min_nodes` accepted). Nodes that do not answer at all are
    asked again until `timeout`."""
    deadline = time.monotonic() + timeout
    directory = NodeDirectory()
    request = wire.SetupRequest(config_json=config_json)
    while True:
        asked = set(directory.node_of.values()) | set(directory.refused)
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new and len(directory.node_of) + len(new) >= min_nodes:
            replies = exchange(grid, {n: request for n in new}, {n: n for n in new}, timeout)
            for node_id, reply in replies.items():
                if reply.has_error() and reply.error.code == wire.SETUP_REFUSED:
                    directory.refused[node_id] = reply.error.reason
                    log(
                        WARNING,
                        "node %d refused the set-up, left out of the run: %s",
                        node_id,
                        reply.error.reason,
                    )
                    continue
                info, error = decode(reply, wire.NodeInfo)
                if info is None:
                    log(WARNING, "node %d failed the set-up (will ask again): %s", node_id, error)
                    continue
                if info.partition_id in directory.node_of:
                    raise RuntimeError(f"two nodes claim partition-id {info.partition_id}")
                directory.node_of[info.partition_id] = node_id
                directory.info[info.partition_id] = info
                directory.num_partitions = info.num_partitions
        expected = directory.expected_partitions()
        accounted = len(directory.node_of) + len(directory.refused_partitions())
        if expected and accounted >= expected:
            if len(directory.node_of) < min_nodes:
                raise RuntimeError(
                    f"only {len(directory.node_of)} of {expected} nodes accepted the set-up "
                    f"(min_nodes={min_nodes}); refused: {refusals(directory)}"
                )
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
                f"only {len(directory.node_of)} nodes connected within {timeout}s "
                f"(min_nodes={min_nodes})"
                + (f"; refused: {refusals(directory)}" if directory.refused else "")
            )
        time.sleep(NODE_POLL_S)
    log(
        INFO, "Node directory: %d partitions -> nodes %s", len(directory.node_of), directory.node_of
    )
    if directory.refused:
        log(WARNING, "Nodes that refused the set-up: %s", refusals(directory))
    return directory


def refusals(directory: NodeDirectory) -> str:
    """The refusals of a directory, one `node <id>: <reason>` each."""
    return "; ".join(f"node {n}: {r}" for n, r in sorted(directory.refused.items())) or "none"


@dataclass
class QueryOutcome:
    """One routed query: per-requester reports and the nodes that failed, by wave."""

    reports: dict[int, wire.CombineReply]
    failed_experts: list[int]
    failed_requesters: list[int]


class Router:
    """Runs the three inference waves for a set of requesters. With `sealed` payloads the
    relay sees only ciphertext: it checks that each is a non-empty byte blob and passes it on."""

    def __init__(
        self,
        grid: CountingGrid,
        directory: NodeDirectory,
        timeout: float,
        feature_dim: int,
        num_classes: int,
        sealed: bool = False,
    ) -> None:
        self.grid = grid
        self.directory = directory
        self.timeout = timeout
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.sealed = sealed

    def _wave(
        self, requests: dict[int, WireMessage], reply_type: type[WireMessage], wave: str
    ) -> tuple[dict[int, Any], dict[int, str]]:
        replies = (
            exchange(self.grid, requests, self.directory.node_of, self.timeout) if requests else {}
        )
        ok, failed = {}, {}
        for pid in requests:
            decoded, error = decode(replies.get(pid), reply_type)
            if decoded is None:
                failed[pid] = str(error)
                log(WARNING, "%s: node %d failed: %s", wave, pid, error)
            else:
                ok[pid] = decoded
        return ok, failed

    def run(
        self, requests: dict[int, wire.RouteRequest], return_predictions: bool = False
    ) -> QueryOutcome:
        """One routed query per requester pid (all with the same query id)."""
        routed, failed_requesters = self._wave(dict(requests), wire.RouteReply, "route")
        # wave 2: every batch addressed to an expert, from every requester, in one message
        outbox: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
        asked: dict[int, list[int]] = {}
        for pid, reply in list(routed.items()):
            problem = self._check_features(reply.features)
            if problem:
                log(WARNING, "route: requester %d sent malformed features: %s", pid, problem)
                failed_requesters[pid] = problem
                del routed[pid]
                continue
            if reply.num_examples == 0:  # nothing to answer (an empty inbox): no combine either
                continue
            asked[pid] = sorted(reply.features)
            for expert, batch in reply.features.items():
                outbox[expert][pid] = batch
        first = next(iter(requests.values()), None)
        query_id = first.query_id if first else ""
        ask = first is not None and asks_familiarity(first)
        owners = {
            e: wire.ExpertQuery(query_id=query_id, batches=b, with_familiarity=ask)
            for e, b in outbox.items()
            if e in self.directory.node_of
        }
        answers, failed_experts = self._wave(owners, wire.ExpertAnswer, "expert")
        failed_experts.update({e: "not in the directory" for e in outbox if e not in owners})
        returned: dict[int, dict[int, np.ndarray]] = defaultdict(
            dict
        )  # requester -> expert -> logits
        ratios: dict[int, dict[int, np.ndarray]] = defaultdict(
            dict
        )  # requester -> expert -> ratios
        for e, answer in answers.items():
            for pid, batch in outbox[e].items():
                value = answer.logits.get(pid)
                expected = (len(batch), self.num_classes)
                if value is None or not (
                    self._is_blob(value) if self.sealed else value.shape == expected
                ):
                    log(WARNING, "expert %d: no or misshapen logits for requester %d", e, pid)
                elif not self.sealed and not np.isfinite(value).all():
                    log(WARNING, "expert %d: non-finite logits for requester %d", e, pid)
                else:
                    returned[pid][e] = value
                    ratio = (answer.familiarity or {}).get(pid)
                    if ask and ratio is not None and ratio.shape == (len(batch),):
                        ratios[pid][e] = ratio
        # wave 3: each requester gets the logits of the experts that answered it
        combine = {
            pid: wire.CombineRequest(
                query_id=query_id,
                logits=returned[pid],
                return_predictions=return_predictions,
                familiarity=dict(ratios[pid]) if ask else None,
            )
            for pid in asked
        }
        reports, failed_combine = self._wave(combine, wire.CombineReply, "combine")
        failed_requesters.update(failed_combine)
        return QueryOutcome(reports, sorted(failed_experts), sorted(failed_requesters))

    @staticmethod
    def _is_blob(value: np.ndarray) -> bool:
        return value.dtype == np.uint8 and value.ndim == 1 and len(value) > 0

    def _check_features(self, features: dict[int, np.ndarray]) -> str | None:
        for e, batch in features.items():
            if e >= self.directory.num_partitions:
                return f"features addressed to expert {e}, which no node holds"
            if self.sealed:
                if not self._is_blob(batch):
                    return f"payload for expert {e} is not a sealed blob"
                continue
            if batch.dtype != np.float32 or batch.ndim != 2 or batch.shape[1] != self.feature_dim:
                return f"batch for expert {e} is {batch.dtype}{list(batch.shape)}"
            if len(batch) == 0 or not np.isfinite(batch).all():
                return f"batch for expert {e} is empty or not finite"
        return None
