"""A hostile server, relay or peer against a node, the router and the strategy.

Table-driven: every probe of the defence issue is a case. A node case sends a real ClientApp one
request a hostile ServerApp could send and asserts the error reply with its reason, that nothing
changed in memory or on disk, and that the node serves the next good request. The run cases play
a hostile relay or peer during a whole (small, in-process) run of the app and assert that the
run completes, the damage stays where it was done, and nothing non-finite is kept.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from nmoe.config import ConfigError, compose_config
from nmoe.data import federation_spec, load_client_data
from nmoe.datasets import dataset_info
from nmoe.device_data import write_device_data
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import WireMessage
from nmoe_protocol.sealing import WAVE_FEATURES, generate_keypair, open_sealed, payload_aad

from .live import NUM_PARTITIONS, LiveNode, RelayGrid, live_fleet, route_request

PEER = 1  # the partition id the test plays


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def config_json(node: LiveNode, **changes: Any) -> str:
    """The node's run config with dotted keys changed, as a hostile server would send it."""
    cfg = json.loads(node.cfg_json)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = cfg
        for part in parents:
            target = target[part]
        target[last] = value
    return json.dumps(cfg)


@pytest.fixture(scope="module")
def device(
    tmp_path_factory: pytest.TempPathFactory, module_task_identity: None
) -> tuple[LiveNode, Any]:
    """A device holding its own data (a data-dir: strict default policy), set up and serving,
    with the test's key pinned as partition PEER's; returns the node and the test's private key."""
    root = tmp_path_factory.mktemp("device")
    cfg = compose_config(["experiment=smoke"])
    data, _ = load_client_data(federation_spec(cfg), 0, NUM_PARTITIONS)
    write_device_data(root / "data", data, dataset_info("digits"), with_global=True)
    node = LiveNode(
        root / "state",
        ["state_key=hostile"],
        {"data-dir": str(root / "data"), "min-feature-noise": 1.0},
    )
    node.set_up()
    private, public = generate_keypair()
    keys = {
        str(PEER): np.frombuffer(public, np.uint8).copy(),
        "2": np.frombuffer(generate_keypair()[1], np.uint8).copy(),
    }
    assert not node.send(wire.InstallRequest(part="peer_keys", params=keys)).has_error()
    return node, private


def good_route(node: LiveNode) -> wire.RouteRequest:
    return wire.RouteRequest(
        query_id="good", splits=["test"], mode="infer", gate="rangate", neighbours=[0, 1, 2]
    )


route = route_request


NodeCase = tuple[str, Callable[[LiveNode], WireMessage | tuple[str, RecordDict]], str]
DEVICE_PROBES: list[NodeCase] = [
    (
        "state_key climbing out of the state-dir",
        lambda n: wire.SetupRequest(config_json=config_json(n, state_key="../../x")),
        "state_key",
    ),
    (
        "state_key as an absolute path",
        lambda n: wire.SetupRequest(config_json=config_json(n, state_key="/tmp/elsewhere")),
        "state_key",
    ),
    (
        "interpolation resolved on the node",
        lambda n: wire.SetupRequest(config_json=config_json(n, output_dir="${oc.env:HOME}")),
        "interpolations",
    ),
    (
        "ten million local epochs",
        lambda n: wire.SetupRequest(config_json=config_json(n, **{"fe.local_epochs": 10**7})),
        "max-epochs",
    ),
    (
        "expert learning rate 1e30",
        lambda n: wire.SetupRequest(config_json=config_json(n, **{"expert.lr": 1e30})),
        "learning rates",
    ),
    (
        "gate learning rate 1e30",
        lambda n: wire.SetupRequest(config_json=config_json(n, **{"gate.lr": 1e30})),
        "learning rates",
    ),
    (
        "zero expert epochs: the sender's weights as the personal expert",
        lambda n: wire.SetupRequest(config_json=config_json(n, **{"expert.epochs": 0})),
        "config key 'expert.epochs'",
    ),
    (
        "predictions asked for the server",
        lambda n: wire.SetupRequest(config_json=config_json(n, record_predictions=True)),
        "keeps its predictions",
    ),
    (
        "unsealed peer payloads",
        lambda n: wire.SetupRequest(config_json=config_json(n, seal_payloads=False)),
        "sealed end to end only",
    ),
    (
        "gate-training features (cache) off the device",
        lambda n: route(mode="cache", splits=["gate"]),
        "split 'gate' does not leave",
    ),
    (
        "training features off the device",
        lambda n: route(splits=["train"]),
        "split 'train' does not leave",
    ),
    (
        "the global split repeated 1,200 times",
        lambda n: route(splits=["global"] * 1200),
        "max-rows",
    ),
    (
        "an unsealed feature batch",
        lambda n: wire.ExpertQuery(query_id="q", batches={PEER: np.zeros((4, 64), np.float32)}),
        "expected a 1-D uint8 array",
    ),
    (
        "a sealed batch replayed under another query",
        lambda n: wire.ExpertQuery(query_id="other", batches={PEER: sealed_rows(n, 4, "q")}),
        "authentication failed",
    ),
    (
        "a peer key swapped mid-run",
        lambda n: wire.InstallRequest(
            part="peer_keys",
            params={str(PEER): np.frombuffer(generate_keypair()[1], np.uint8).copy()},
        ),
        "is pinned",
    ),
    (
        "a key for a partition outside the federation",
        lambda n: wire.InstallRequest(
            part="peer_keys", params={"7": np.frombuffer(generate_keypair()[1], np.uint8).copy()}
        ),
        "outside the federation",
    ),
    (
        "parameters full of NaN installed as F",
        lambda n: wire.InstallRequest(
            part="fe", params={k: np.full_like(v, np.nan) for k, v in n.params.items()}
        ),
        "non-finite",
    ),
    (
        "a run on another dataset than the device holds",
        lambda n: wire.SetupRequest(
            config_json=config_json(n, **{"dataset.name": "fashion_mnist"})
        ),
        "this device holds digits",
    ),
]
TEST_KEY: dict[str, Any] = {}


def sealed_rows(node: LiveNode, rows: int, query: str) -> np.ndarray:
    """Rows of features sealed by the test (as partition PEER) for the device (partition 0)."""
    from nmoe_protocol.sealing import public_key_bytes, seal

    private = TEST_KEY["private"]
    device_public = public_key_bytes(_device_key(node))
    aad = payload_aad(query, WAVE_FEATURES, PEER, 0)
    return seal(np.zeros((rows, 64), np.float32), private, device_public, aad)


def _device_key(node: LiveNode) -> Any:
    from nmoe_protocol.sealing import load_or_create_keypair

    return load_or_create_keypair(node.state_dir)[0]


def test_a_planted_cifar_pickle_never_runs(tmp_path: Path) -> None:
    """A run config pointing a simulated node at a folder with a planted `data_batch_1`: the
    set-up is refused by the restricted unpickler and the payload never runs."""
    folder = tmp_path / "planted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps(_Payload(str(marker))))
    node = LiveNode(tmp_path / "state", ["seal_payloads=false"])
    reply = node.send(
        wire.SetupRequest(
            config_json=config_json(
                node, **{"dataset.name": "cifar10", "dataset.path": str(folder.parent)}
            )
        )
    )
    assert reply.has_error() and "refused" in reply.error.reason, reply.error
    assert not marker.exists()
    assert not node.send(wire.SetupRequest(config_json=node.cfg_json)).has_error()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("case,request_of,reason", DEVICE_PROBES, ids=[c[0] for c in DEVICE_PROBES])
def test_device_refuses_and_keeps_serving(device, case, request_of, reason) -> None:
    node, private = device
    TEST_KEY["private"] = private
    before = node.snapshot()
    reply = node.send(request_of(node))
    assert reply.has_error(), f"{case}: accepted"
    assert reason in reply.error.reason, reply.error.reason
    assert node.snapshot() == before, f"{case}: state changed"
    assert not any(p.name in ("x", "elsewhere") for p in node.state_dir.parent.parent.rglob("*"))
    good = node.send(good_route(node))
    assert not good.has_error(), good.error.reason


def test_device_adds_its_minimum_noise_to_every_row_sent(device) -> None:
    """min-feature-noise=1.0 in the node config: whatever the run config says (0), every row the
    device sends differs from its clean feature by noise of std about 1."""
    import torch

    node, private = device
    reply = node.send(
        wire.RouteRequest(
            query_id="noise",
            splits=["test"],
            mode="infer",
            gate="rangate",
            neighbours=[0, 1, 2],
            seed=3,
        )
    )
    assert not reply.has_error(), reply.error.reason
    blob = wire.RouteReply.from_message(reply).features[PEER]
    from nmoe_protocol.sealing import public_key_bytes

    sent = open_sealed(
        blob,
        private,
        public_key_bytes(_device_key(node)),
        payload_aad("noise", WAVE_FEATURES, 0, PEER),
    )
    from client_app.node import open_node

    clean = open_node(node.context).features(open_node(node.context).data.test_x)
    distance = torch.cdist(torch.from_numpy(sent), clean).min(dim=1).values
    per_coordinate = float((distance**2).mean() / sent.shape[1]) ** 0.5
    assert 0.8 < per_coordinate < 1.2, per_coordinate
    node.send(wire.CombineRequest(query_id="noise", logits={}))


def test_pending_queries_are_capped_and_expire(tmp_path: Path) -> None:
    """40 routed queries never combined: a node keeps at most max-pending, drops expired ones."""
    node = LiveNode(tmp_path, ["seal_payloads=false"], {"max-pending": 4, "pending-ttl-s": 3600})
    node.set_up()
    for i in range(4):
        assert not node.send(route(query_id=f"q{i}")).has_error()
    refused = node.send(route(query_id="q4"))
    assert refused.has_error() and "max-pending=4" in refused.error.reason
    pending = [n for n in node.context.state.array_records if n.startswith("scratch/pending.")]
    assert len(pending) == 4
    short = LiveNode(
        tmp_path / "short", ["seal_payloads=false"], {"max-pending": 4, "pending-ttl-s": 0.0}
    )
    short.set_up()
    for i in range(40):
        assert not short.send(route(query_id=f"q{i}")).has_error()
    assert (
        len([n for n in short.context.state.array_records if n.startswith("scratch/pending.")]) == 1
    )


def test_too_many_rows_in_one_expert_message(tmp_path: Path) -> None:
    """The row limit holds for all batches of a message together, whatever max_query_batch says."""
    node = LiveNode(
        tmp_path, ["seal_payloads=false", "max_query_batch=1000000000"], {"max-rows": 1000}
    )
    node.set_up()
    batches = {p: np.zeros((400, 64), np.float32) for p in range(3)}
    reply = node.send(wire.ExpertQuery(query_id="q", batches=batches))
    assert reply.has_error() and "max-rows=1000" in reply.error.reason
    assert not node.send(wire.ExpertQuery(query_id="q", batches={1: batches[1]})).has_error()


def test_personal_gate_keys_never_set_by_the_server(tmp_path: Path) -> None:
    """FedGate with a personal output layer: the server may set the trunk, never the head, and a
    node's reply carries only the keys due for synchronisation."""
    from nmoe import gates

    node = LiveNode(
        tmp_path, ["seal_payloads=false", "gate.sync_trunk_every=1", "gate.sync_head_every=0"]
    )
    node.set_up()
    params = gates.get("fedgate").initial_params(node.cfg.model, NUM_PARTITIONS, 0)
    before = node.snapshot()
    reply = node.send(wire.InstallRequest(part="gate", gate="fedgate", params=params))
    assert (
        reply.has_error() and "may not set" in reply.error.reason and "head." in reply.error.reason
    )
    assert node.snapshot() == before
    trunk = {k: v for k, v in params.items() if k.startswith("trunk.")}
    assert not node.send(wire.InstallRequest(part="gate", gate="fedgate", params=trunk)).has_error()


def test_a_state_file_of_another_node_is_set_aside(tmp_path: Path) -> None:
    """A state file planted where this node keeps its own (another partition's) is refused and
    renamed; the node starts without it and serves."""
    other = LiveNode(tmp_path, ["seal_payloads=false", "state_key=shared"], partition_id=1)
    other.set_up()
    planted = tmp_path / "shared" / "partition-0.safetensors"
    planted.write_bytes((tmp_path / "shared" / "partition-1.safetensors").read_bytes())
    victim = LiveNode(tmp_path, ["seal_payloads=false", "state_key=shared"])
    reply = victim.send(wire.SetupRequest(config_json=victim.cfg_json))
    assert not reply.has_error(), reply.error.reason
    assert wire.NodeInfo.from_message(reply).holds == []
    assert not planted.exists() and list(planted.parent.glob("partition-0.safetensors.refused-*"))


# ---------------------------------------------------------------------------- whole runs
def tiny_run(
    tmp_path: Path,
    tamper: Any = None,
    overrides: list[str] | None = None,
    prepare: Callable[[dict[int, LiveNode]], None] | None = None,
    node_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete run of the app (3 in-process nodes behind a RelayGrid); returns results.json."""
    from server_app.app import run_job

    cfg = compose_config(
        [
            "experiment=smoke",
            "fe.rounds=2",
            "gate=rangate",
            "partition=iid",
            f"output_dir={tmp_path / 'out'}",
            *(overrides or []),
        ]
    )
    nodes = live_fleet(tmp_path, overrides, node_config)
    if prepare is not None:
        prepare(nodes)
    run_job(RelayGrid(nodes, tamper), cfg)
    return json.loads((tmp_path / "out" / "results.json").read_text())


class HostileRelay:
    """Tampers with chosen replies on their way to the server: by message type, the partition
    that sent it and which of its replies of that type it is (1st, 2nd ...)."""

    def __init__(self, tampers: dict[tuple[str, int, int], Callable[[Message], None]]) -> None:
        self.tampers = tampers
        self.seen: dict[tuple[str, int], int] = {}
        self.done: list[tuple[str, int, int]] = []

    def __call__(self, request: Message, reply: Message) -> Message:
        key = (request.metadata.message_type, request.metadata.dst_node_id - 10)
        self.seen[key] = self.seen.get(key, 0) + 1
        tamper = self.tampers.get((*key, self.seen[key]))
        if tamper is not None and not reply.has_error():
            tamper(reply)
            self.done.append((*key, self.seen[key]))
        return reply


def nan_params(reply: Message) -> None:
    first = next(iter(reply.content["params"].keys()))
    value = reply.content["params"][first].numpy().copy()
    value.flat[0] = np.nan
    reply.content["params"][first] = Array(value)


def huge_count(reply: Message) -> None:
    reply.content["metrics"]["num_examples"] = 10**12


def unknown_record(reply: Message) -> None:
    reply.content["sneaky"] = ConfigRecord({"a": 1})


def flip_bits(reply: Message) -> None:
    for key in list(reply.content["logits"].keys()):
        value = reply.content["logits"][key].numpy().copy()
        value[-1] ^= 1
        reply.content["logits"][key] = Array(value)


def drop_batch_of_requester_2(reply: Message) -> None:
    del reply.content["logits"]["2"]


def check_run(results: dict[str, Any], root: Path) -> None:
    """Completed, every client answered, nothing non-finite kept by anyone."""
    from client_app.state import read_state_file

    assert results["status"] == "completed", results.get("error")
    for table in ("accuracy", "accuracy_global"):
        assert len(results[table]["nmoe"]["per_client"]) == NUM_PARTITIONS
    for path in root.rglob("*.safetensors"):
        for group in read_state_file(path).values():
            assert all(np.isfinite(v).all() for v in group.values()), f"{path}: non-finite kept"


def test_sealed_run_survives_a_hostile_relay(tmp_path: Path) -> None:
    """A relay that poisons FedAvg replies (NaN, 1e12 examples), breaks the contract of an
    expert reply (an unknown record) and flips a bit in sealed answers: the run completes, the
    poisoned replies are refused (named in `dropped`), the broken or tampered answers count as
    failed experts and the queries that needed them are answered without them."""
    relay = HostileRelay(
        {
            (wire.TRAIN_EXTRACTOR, 2, 1): nan_params,
            (wire.TRAIN_EXTRACTOR, 1, 2): huge_count,
            (wire.EXPERT, 2, 1): unknown_record,  # in the routed evaluation
        }
    )
    results = tiny_run(tmp_path, relay)
    check_run(results, tmp_path)
    assert len(relay.done) == 3
    dropped = {(d["stage"], d.get("round")): d["clients"] for d in results["extra"]["dropped"]}
    assert dropped[("fe_ce", 1)] == [2] and dropped[("fe_ce", 2)] == [1]
    failures = results["extra"]["inference_failures"]
    assert any(2 in f["failed_experts"] for f in failures)
    flipped = HostileRelay({(wire.EXPERT, 1, 1): flip_bits})
    results = tiny_run(tmp_path / "flipped", flipped)
    check_run(results, tmp_path / "flipped")
    assert sum(results["extra"]["degraded_queries"]["rangate"].values()) > 0


def test_plain_run_survives_a_missing_batch_and_a_shouting_peer(tmp_path: Path) -> None:
    """Unsealed payloads: an expert reply missing one requester's logits fails only that batch;
    a peer whose expert answers logits of 1e6 for class 3 (replaced right after stage 2) is
    bounded by its mixture weight: with k=3 (weight 1/3) the other requesters' predictions are
    not all 3. (Where it keeps half the weight, as for requester 2 once expert 1's answer is
    lost, a saturated peer decides: bounded probabilities limit a liar to its weight.)"""
    nodes: dict[int, LiveNode] = {}

    def shout(reply: Message) -> None:
        node = nodes[12]
        weights = {k: v.numpy().copy() for k, v in node.context.state["model/expert"].items()}
        last = sorted(k for k in weights if k.endswith(".bias"))[-1]
        weights[last][:] = 0.0
        weights[last][3] = 1e6
        node.context.state["model/expert"] = ArrayRecord({k: Array(v) for k, v in weights.items()})

    relay = HostileRelay(
        {(wire.TRAIN_EXPERT, 2, 1): shout, (wire.EXPERT, 1, 1): drop_batch_of_requester_2}
    )
    overrides = [
        "seal_payloads=false",
        "gate.k=3",
        "fe.rounds=6",
        "expert.epochs=15",
        "record_predictions=true",
    ]
    results = tiny_run(tmp_path, relay, overrides, prepare=nodes.update)
    check_run(results, tmp_path)
    assert sum(results["extra"]["degraded_queries"]["rangate"].values()) > 0
    predictions = results["predictions"]["rangate"]["global"]
    for client in ("0", "1"):
        share_of_3 = float(np.mean(np.array(predictions[client]) == 3))
        assert share_of_3 < 0.6, f"client {client}: {share_of_3:.2f} of predictions are class 3"


def test_nodes_that_keep_their_gate_split_skip_the_trainable_gates(tmp_path: Path) -> None:
    """Nodes whose owners keep the `gate` split: the trainable baseline gates are skipped with
    the reason (the run completes with the others); a trainable configured gate stops the run
    with a message that says why and what to use instead."""
    from server_app.run import StageFailed

    keep = {"share-splits": "test,global"}
    results = tiny_run(tmp_path, overrides=["baselines=[fedgate,rollgate]"], node_config=keep)
    assert results["status"] == "completed"
    assert set(results["extra"]["skipped"]) == {"fedgate", "rollgate"}
    assert "share-splits" in results["extra"]["skipped"]["fedgate"]
    assert set(results["accuracy"]) >= {"rangate", "local_expert"}
    assert "fedgate" not in results["accuracy"]
    with pytest.raises(StageFailed, match="gate 'fedgate'.*share-splits"):
        tiny_run(tmp_path / "fedgate", overrides=["gate=fedgate"], node_config=keep)


def test_interpolation_in_an_override_is_refused_before_it_resolves(monkeypatch) -> None:
    monkeypatch.setenv("NMOE_TEST_SECRET", "s3cret")
    with pytest.raises(ConfigError) as err:
        compose_config(["output_dir=${oc.env:NMOE_TEST_SECRET}"])
    assert "s3cret" not in str(err.value) and "interpolations" in str(err.value)


# ---------------------------------------------------------------------------- pins, refusals
def peer_keys(*pids: int, **given: bytes) -> dict[str, np.ndarray]:
    """A `peer_keys` install: fresh keys for `pids`, the `given` ones (`p1=...`) as they are."""
    keys = {str(p): generate_keypair()[1] for p in pids}
    keys.update({name[1:]: key for name, key in given.items()})
    return {pid: np.frombuffer(key, np.uint8).copy() for pid, key in keys.items()}


def test_a_restarted_node_keeps_its_pins_and_refuses_a_swapped_key(tmp_path: Path) -> None:
    """Pins survive a restart (an empty context.state, the same state-dir): a swapped key for a
    pinned partition is still refused, and the pinned peer is still served and answered."""
    from nmoe_protocol.sealing import WAVE_LOGITS, load_or_create_keypair, public_key_bytes, seal

    node = LiveNode(tmp_path / "state", ["state_key=pins"])
    node.set_up()
    private, public = generate_keypair()
    install = wire.InstallRequest(part="peer_keys", params=peer_keys(2, p1=public))
    assert not node.send(install).has_error()
    pins_file = tmp_path / "state" / "setup" / "run-1-partition-0-peer-keys.json"
    saved = json.loads(pins_file.read_text())
    assert saved["keys"][str(PEER)] == public.hex() and saved["owner"] == "partition-0-of-3"
    assert saved["run_id"] == 1 and set(saved["keys"]) == {"1", "2"}

    restarted = LiveNode(tmp_path / "state", ["state_key=pins"])  # a new process, same device
    assert not restarted.context.state.array_records
    files = lambda: {k: v for k, v in restarted.snapshot().items() if not k.startswith("model/")}
    before = files()
    reply = restarted.send(wire.InstallRequest(part="peer_keys", params=peer_keys(1)))
    assert reply.has_error() and "is pinned for this run" in reply.error.reason, reply.error
    assert files() == before and json.loads(pins_file.read_text()) == saved
    device_public = public_key_bytes(load_or_create_keypair(tmp_path / "state")[0])
    rows = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    blob = seal(rows, private, device_public, payload_aad("q1", WAVE_FEATURES, PEER, 0))
    reply = restarted.send(wire.ExpertQuery(query_id="q1", batches={PEER: blob}))
    assert not reply.has_error(), reply.error.reason
    answer = wire.ExpertAnswer.from_message(reply).logits[PEER]
    logits = open_sealed(answer, private, device_public, payload_aad("q1", WAVE_LOGITS, 0, PEER))
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    # the same keys again are fine (an idempotent re-send); a new partition's key is added
    again = wire.InstallRequest(part="peer_keys", params=peer_keys(p1=public))
    assert not restarted.send(again).has_error()


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda d: {**d, "run_id": 2}, "belongs to run 2"),
        (lambda d: {**d, "owner": "partition-1-of-3"}, "belongs to 'partition-1-of-3'"),
        (lambda d: {**d, "keys": {**d["keys"], "9": "00" * 32}}, "outside the federation"),
        (lambda d: {**d, "keys": {"1": "zz" * 32}}, "refused"),
        (lambda d: {**d, "extra": 1}, "fields"),
        (lambda d: "not json {", "refused"),
    ],
    ids=["another run", "another node", "partition outside", "bad hex", "unknown field", "junk"],
)
def test_a_bad_pins_file_is_refused_and_kept(tmp_path: Path, change: Any, reason: str) -> None:
    """A pins file that fails validation is neither trusted nor replaced: sealing and pinning
    fail with the reason (the owner decides), the file stays as it is; training still works."""
    node = LiveNode(tmp_path / "state", ["state_key=pins"])
    node.set_up()
    assert not node.send(wire.InstallRequest(part="peer_keys", params=peer_keys(1, 2))).has_error()
    pins_file = tmp_path / "state" / "setup" / "run-1-partition-0-peer-keys.json"
    altered = change(json.loads(pins_file.read_text()))
    pins_file.write_text(altered if isinstance(altered, str) else json.dumps(altered))
    planted = pins_file.read_bytes()
    restarted = LiveNode(tmp_path / "state", ["state_key=pins"])
    for request in (
        wire.InstallRequest(part="peer_keys", params=peer_keys(1, 2)),
        route(query_id="after-restart"),
    ):
        reply = restarted.send(request)
        assert reply.has_error() and reason in reply.error.reason, reply.error
        assert "delete the file" in reply.error.reason
    assert pins_file.read_bytes() == planted
    assert not restarted.send(wire.ExpertRequest(init="scratch")).has_error()


def test_a_node_that_refuses_the_set_up_is_left_out_at_once(tmp_path: Path) -> None:
    """A node whose policy refuses the run config answers with a SETUP_REFUSED error reply
    naming its partition and reason; discovery leaves it out at once (asked once, no waiting
    for round_timeout_s) and goes on with the others, or fails at once naming the refusal
    when too few remain."""
    import time

    from nmoe_strategy.comm import CommLedger, CountingGrid
    from nmoe_strategy.router import discover

    strict = {"require-sealing": "true"}
    nodes = {
        10 + p: LiveNode(
            tmp_path / f"node{p}", node_config=strict if p == 2 else None, partition_id=p
        )
        for p in range(NUM_PARTITIONS)
    }
    plain = config_json(nodes[10], seal_payloads=False)
    asked: list[int] = []

    def count(request: Message, reply: Message) -> Message:
        asked.append(request.metadata.dst_node_id)
        return reply

    grid = CountingGrid(RelayGrid(nodes, count), CommLedger(), None, 0.01)
    started = time.monotonic()
    directory = discover(grid, plain, min_nodes=2, timeout=600)
    assert time.monotonic() - started < 60
    assert directory.partition_ids == [0, 1] and list(directory.refused) == [12]
    reason = directory.refused[12]
    assert reason.startswith("setup refused by partition 2 of 3: PolicyError"), reason
    assert "require-sealing" in reason and asked.count(12) == 1
    assert directory.to_dict()["refused"] == {"12": reason}
    reply = nodes[12].send(wire.SetupRequest(config_json=plain))
    assert reply.has_error() and reply.error.code == wire.SETUP_REFUSED
    with pytest.raises(RuntimeError, match=r"only 2 of 3 nodes accepted .*require-sealing"):
        discover(grid, plain, min_nodes=3, timeout=600)
    assert time.monotonic() - started < 120
    assert discover(grid, nodes[10].cfg_json, min_nodes=3, timeout=600).partition_ids == [0, 1, 2]


def test_a_device_with_bad_data_refuses_the_set_up(tmp_path: Path) -> None:
    """Bad device data is a refusal too: the server recognises it and does not ask again."""
    (tmp_path / "data").mkdir()
    node = LiveNode(tmp_path / "state", node_config={"data-dir": str(tmp_path / "data")})
    reply = node.send(wire.SetupRequest(config_json=node.cfg_json))
    assert reply.has_error() and reply.error.code == wire.SETUP_REFUSED
    assert reply.error.reason.startswith("setup refused by partition 0 of 3: DeviceDataError")
    assert wire.parse_setup_refusal(reply.error.reason) == (0, NUM_PARTITIONS)


def test_familiarity_travels_sealed_with_the_logits(tmp_path: Path) -> None:
    """An expert asked for its familiarity (KnowGate) returns it as one extra column of the
    sealed logits: nothing about it reaches the relay in clear."""
    from nmoe_protocol.sealing import WAVE_LOGITS, load_or_create_keypair, public_key_bytes, seal

    node = LiveNode(tmp_path / "state")
    node.set_up()
    private, public = generate_keypair()
    install = wire.InstallRequest(part="peer_keys", params=peer_keys(2, p1=public))
    assert not node.send(install).has_error()
    device_public = public_key_bytes(load_or_create_keypair(tmp_path / "state")[0])
    rows = np.random.default_rng(1).random((6, 64), dtype=np.float32)
    blob = seal(rows, private, device_public, payload_aad("k", WAVE_FEATURES, PEER, 0))
    reply = node.send(wire.ExpertQuery(query_id="k", batches={PEER: blob}, with_familiarity=True))
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.array_records) == {"logits"}
    answer = wire.ExpertAnswer.from_message(reply)
    assert answer.familiarity is None and answer.logits[PEER].dtype == np.uint8
    opened = open_sealed(
        answer.logits[PEER], private, device_public, payload_aad("k", WAVE_LOGITS, 0, PEER)
    )
    assert opened.shape == (6, 11) and (opened[:, -1] >= 0).all()


def test_a_neighbour_without_a_pinned_key_is_sent_nothing_and_the_route_is_answered(
    tmp_path: Path,
) -> None:
    """A neighbour that was down at discovery has no key in the run's set-up: the requester's
    route is still answered, with no batch (sealed or clear) for that neighbour."""
    node = LiveNode(tmp_path / "state", ["state_key=unpinned", "gate.local_first_quantile=0"])
    node.set_up()
    assert not node.send(wire.InstallRequest(part="peer_keys", params=peer_keys(1))).has_error()
    reply = node.send(route_request(query_id="q-unpinned", gate="rangate"))
    assert not reply.has_error(), reply.error.reason
    features = wire.RouteReply.from_message(reply).features
    assert 2 not in features and features, features  # partition 1 still gets its rows
    assert {k: v for k, v in node.snapshot().items() if "peer-keys" in k}  # pins on disk
