"""A real ClientApp answering messages in-process, for tests that speak the wire contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from client_app.app import app as client_app
from nmoe.config import compose_config, to_dict
from nmoe.models import build_bundle, build_expert, stage1_keys, state_numpy
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import WireMessage

NUM_PARTITIONS = 3
FEATURE_DIM = 64
IMAGE_SHAPE = (1, 8, 8)


class LiveNode:
    """A real ClientApp with its Context (node config: partition 0 of 3, a state-dir, and
    `node_config` extras), answering messages in-process."""

    def __init__(
        self,
        state_dir: Path,
        overrides: list[str] | None = None,
        node_config: dict[str, Any] | None = None,
        partition_id: int = 0,
    ) -> None:
        cfg = compose_config(["experiment=smoke", *(overrides or [])])
        self.cfg = cfg
        self.cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
        self.state_dir = state_dir
        self.context = Context(
            run_id=1,
            node_id=1,
            state=RecordDict(),
            run_config={},
            node_config={
                "partition-id": partition_id,
                "num-partitions": NUM_PARTITIONS,
                "state-dir": str(state_dir),
                **(node_config or {}),
            },
        )
        bundle = build_bundle(cfg.model, IMAGE_SHAPE, 10, 0)
        self.params = {
            k: v for k, v in state_numpy(bundle).items() if k in stage1_keys(bundle, "fedce")
        }

    def send(self, request: WireMessage | tuple[str, RecordDict]) -> Message:
        """A request, or (message type, raw content) for content the contract forbids."""
        if isinstance(request, WireMessage):
            message_type, content = request.TYPE, request.to_content()
        else:
            message_type, content = request
        return client_app(Message(content, dst_node_id=1, message_type=message_type), self.context)

    def set_up(self) -> None:
        """Set-up, install F, train the expert: a node ready to serve."""
        for request in (
            wire.SetupRequest(config_json=self.cfg_json),
            wire.InstallRequest(part="fe", params=self.params),
            wire.ExpertRequest(init="scratch"),
        ):
            reply = self.send(request)
            assert not reply.has_error(), reply.error.reason

    def snapshot(self) -> dict[str, str]:
        """Digest of every persisted group in memory and of every file under the state dir."""
        out = {
            name: hashlib.sha256(b"".join(a.data for a in rec.values())).hexdigest()
            for name, rec in self.context.state.array_records.items()
            if name.startswith("model/")
        }
        for path in sorted(self.state_dir.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def fine_tuned_from_shared(state_dir: Path, overrides: list[str]) -> LiveNode:
    """A LiveNode set up with F and a random shared expert (seed 321) installed, whose personal
    expert was then fine-tuned from it (`expert=with_shared expert.init_from_shared=true` and
    `overrides`)."""
    live = LiveNode(state_dir, ["expert=with_shared", "expert.init_from_shared=true", *overrides])
    shared = state_numpy(build_expert(live.cfg.model, 10, 321))
    for request in (
        wire.SetupRequest(config_json=live.cfg_json),
        wire.InstallRequest(part="fe", params=live.params),
        wire.InstallRequest(part="shared_expert", params=shared),
        wire.ExpertRequest(init="shared"),
    ):
        reply = live.send(request)
        assert not reply.has_error(), reply.error.reason
    return live


def live_fleet(
    root: Path, overrides: list[str] | None = None, node_config: dict[str, Any] | None = None
) -> dict[int, LiveNode]:
    """One LiveNode per partition under `root/node<p>`, by the node ids a `RelayGrid` relays to
    (10 + partition id)."""
    return {
        10 + p: LiveNode(root / f"node{p}", overrides, node_config, partition_id=p)
        for p in range(NUM_PARTITIONS)
    }


class ServerDied(Exception):
    """Raised by a relay's tamper hook to stop the ServerApp in the middle of a run."""


def dies_in_stage1_round(rnd: int) -> Any:
    """A `RelayGrid` tamper hook that kills the ServerApp as it sends stage-1 round `rnd` (after
    round `rnd - 1`'s checkpoint)."""
    sent: list[str] = []

    def tamper(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == wire.TRAIN_EXTRACTOR:
            sent.append(request.metadata.message_id)
            if len(sent) > (rnd - 1) * NUM_PARTITIONS:
                raise ServerDied(f"killed in stage-1 round {rnd}")
        return reply

    return tamper


class RelayGrid:
    """A Grid that relays every message to LiveNodes in-process (node id -> node), the way the
    SuperLink would, with a `tamper(request, reply) -> reply | None` hook playing a hostile relay
    or peer (None: the reply never arrives)."""

    def __init__(self, nodes: dict[int, LiveNode], tamper: Any = None) -> None:
        self.nodes = nodes
        self.tamper = tamper
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Any) -> list[str]:
        import uuid

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = self.nodes[message.metadata.dst_node_id]
            reply = client_app(message, node.context)
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            if reply is not None:
                self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def route_request(**changes: Any) -> wire.RouteRequest:
    """A valid wave-1 request for partition 0 of three (rangate over the local test split),
    with `changes` applied."""
    values = {
        "query_id": "q",
        "splits": ["test"],
        "mode": "infer",
        "gate": "rangate",
        "neighbours": [0, 1, 2],
        "seed": 0,
    }
    return wire.RouteRequest(**{**values, **changes})


def simulate(out: Path, overrides: list[str]) -> dict[str, Any]:
    """One in-process Flower simulation of the composed `overrides` (as many SuperNodes as
    `simulation.num_clients`), written to `out`; returns its results.json."""
    from flwr.simulation import run_simulation

    from server_app.app import make_server_app

    cfg = compose_config([*overrides, f"output_dir={out}"])
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app,
        num_supernodes=int(cfg.simulation.num_clients),
        backend_config={"client_resources": {"num_cpus": 1.0}},
    )
    path = out / "results.json"
    assert path.is_file(), "the simulation wrote no results.json"
    return json.loads(path.read_text())
