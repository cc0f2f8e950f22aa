"""Every bad input to a live ClientApp gets an error reply naming the reason; the node keeps
serving and its state (in memory and on disk) is unchanged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import app as client_app
from nmoe.config import compose_config, to_dict
from nmoe.models import build_bundle, stage1_keys, state_numpy

NUM_PARTITIONS = 3
MAX_BATCH = 50
FEATURE_DIM = 64


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class LiveNode:
    """A real ClientApp with its Context, answering messages in-process."""

    def __init__(self, state_dir: Path, overrides: list[str] | None = None) -> None:
        cfg = compose_config(
            [
                "experiment=smoke",
                f"max_query_batch={MAX_BATCH}",
                "state_key=bad-input",
                *(overrides or []),
            ]
        )
        self.cfg = cfg
        self.cfg_json = json.dumps(to_dict(cfg), sort_keys=True)
        self.state_dir = state_dir
        self.context = Context(
            run_id=1,
            node_id=1,
            state=RecordDict(),
            run_config={},
            node_config={
                "partition-id": 0,
                "num-partitions": NUM_PARTITIONS,
                "state-dir": str(state_dir),
            },
        )
        bundle = build_bundle(cfg.model, (1, 8, 8), 10, 0)
        self.bundle = ArrayRecord({k: Array(v) for k, v in state_numpy(bundle).items()})

    def send(self, message_type: str, records: dict) -> Message:
        msg = Message(RecordDict(records), dst_node_id=1, message_type=message_type)
        return client_app(msg, self.context)

    def config(self, **values) -> ConfigRecord:
        return ConfigRecord({"nmoe": self.cfg_json, **values})

    def snapshot(self) -> dict[str, str]:
        """Digest of every persisted group in memory and of the state files on disk."""
        out = {
            name: hashlib.sha256(b"".join(a.data for a in rec.values())).hexdigest()
            for name, rec in self.context.state.array_records.items()
            if name.startswith("model/")
        }
        for path in sorted(self.state_dir.rglob("*.safetensors")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def features(
    rows: int = 4, dim: int = FEATURE_DIM, dtype=np.float32, fill: float | None = None
) -> RecordDict:
    value = np.random.default_rng(0).normal(size=(rows, dim)).astype(dtype)
    if fill is not None and rows:
        value[0, 0] = fill
    return {"features": ArrayRecord({"from_1": Array(value)})}


def route_config(node: LiveNode, **changes) -> dict:
    values = {
        "query-id": "q",
        "split": "test",
        "mode": "infer",
        "gate": "rangate",
        "k": 2,
        "neighbours": "0,1,2",
        "seed": 0,
        "return-predictions": False,
    }
    values.update(changes)
    return {"config": node.config(**{k: v for k, v in values.items() if v is not None})}


def bad_bundle(node: LiveNode, change: Callable[[dict], None], method: str | None = None) -> dict:
    """The initial bundle (only the keys stage-1 `method` trains, if given), altered by `change`."""
    keep = (
        stage1_keys(build_bundle(node.cfg.model, (1, 8, 8), 10, 0), method)
        if method
        else list(node.bundle.keys())
    )
    arrays = {k: v.numpy().copy() for k, v in node.bundle.items() if k in keep}
    change(arrays)
    return {
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "config": node.config(**{"server-round": 1}),
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, module_task_identity: None) -> LiveNode:
    live = LiveNode(tmp_path_factory.mktemp("state"))
    assert not live.send("query.info", {"config": live.config()}).has_error()
    reply = live.send(
        "train.expert", {"arrays": live.bundle, "config": live.config(**{"own-head": False})}
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return live


BAD_INPUTS: list[tuple[str, str, Callable[[LiveNode], dict], str]] = [
    ("wrong shape", "query.expert", lambda n: features(dim=FEATURE_DIM - 1), "shape (4, 63)"),
    (
        "feature dim mismatch, 3-D",
        "query.expert",
        lambda n: {
            "features": ArrayRecord({"from_1": Array(np.zeros((2, 4, FEATURE_DIM), np.float32))})
        },
        "expected (n, 64)",
    ),
    ("wrong dtype", "query.expert", lambda n: features(dtype=np.float64), "dtype float64"),
    ("NaN", "query.expert", lambda n: features(fill=np.nan), "non-finite"),
    ("Inf", "query.expert", lambda n: features(fill=np.inf), "non-finite"),
    ("empty batch", "query.expert", lambda n: features(rows=0), "empty batch"),
    (
        "batch over the limit",
        "query.expert",
        lambda n: features(rows=MAX_BATCH + 1),
        f"max_query_batch={MAX_BATCH}",
    ),
    (
        "missing record",
        "query.expert",
        lambda n: {"config": n.config()},
        "lacks array record 'features'",
    ),
    (
        "k larger than neighbourhood",
        "query.route",
        lambda n: route_config(n, k=NUM_PARTITIONS + 1),
        "larger than the neighbourhood",
    ),
    (
        "missing config key",
        "query.route",
        lambda n: route_config(n, k=None),
        "lacks config key 'k'",
    ),
    ("k not positive", "query.route", lambda n: route_config(n, k=0), "k must be > 0"),
    (
        "unknown mode",
        "query.route",
        lambda n: route_config(n, mode="teleport"),
        "unknown mode 'teleport'",
    ),
    (
        "unknown split",
        "query.route",
        lambda n: route_config(n, split="validation"),
        "unknown split 'validation'",
    ),
    (
        "unknown gate",
        "query.route",
        lambda n: route_config(n, gate="oracle"),
        "unknown gate 'oracle'",
    ),
    (
        "neighbours without self",
        "query.route",
        lambda n: route_config(n, neighbours="1,2"),
        "must include the requester",
    ),
    (
        "neighbour out of range",
        "query.route",
        lambda n: route_config(n, neighbours="0,7"),
        "outside [0, 3)",
    ),
    (
        "parameters for unknown keys",
        "train.fe_ce",
        lambda n: bad_bundle(
            n, lambda a: a.update({"fe.backdoor": np.zeros(3, np.float32)}), "fedce"
        ),
        "unknown parameter keys: ['fe.backdoor']",
    ),
    (
        "untrained projector sent to FedCE",
        "train.fe_ce",
        lambda n: bad_bundle(n, lambda a: None),
        "unknown parameter keys: ['projector.",
    ),
    (
        "parameter shape mismatch",
        "train.fe_ce",
        lambda n: bad_bundle(
            n, lambda a: a.update({"head.bias": np.zeros(11, np.float32)}), "fedce"
        ),
        "shape mismatch for 'head.bias'",
    ),
    (
        "NaN parameters",
        "train.expert",
        lambda n: {
            **bad_bundle(n, lambda a: a["head.weight"].fill(np.nan)),
            "config": n.config(**{"own-head": False}),
        },
        "non-finite values",
    ),
    (
        "missing parameter keys",
        "train.expert",
        lambda n: {
            **bad_bundle(n, lambda a: a.pop("head.bias")),
            "config": n.config(**{"own-head": False}),
        },
        "missing parameter keys",
    ),
    (
        "untrainable gate",
        "train.gate",
        lambda n: {
            "arrays": ArrayRecord(),
            "config": n.config(gate="rangate", install=False, **{"return-keys": ""}),
        },
        "not trainable",
    ),
    (
        "unknown expert init",
        "train.expert",
        lambda n: {"config": n.config(**{"own-head": False, "expert-init": "pretrained"})},
        "unknown expert-init 'pretrained'",
    ),
    (
        "combine for an unknown query",
        "query.combine",
        lambda n: {
            "logits": ArrayRecord(),
            "config": n.config(**{"query-id": "nope", "mode": "infer", "failed": ""}),
        },
        "no 'scratch/pending.nope'",
    ),
]


@pytest.mark.parametrize(
    "case,message_type,content,reason", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_gets_error_reply_and_node_keeps_serving(
    node: LiveNode, case, message_type, content, reason
) -> None:
    before = node.snapshot()
    reply = node.send(message_type, content(node))
    assert reply.has_error(), f"{case}: accepted"
    assert reason in str(reply.error.reason), reply.error.reason
    assert node.snapshot() == before, f"{case}: state changed"
    good = node.send("query.expert", features())
    assert not good.has_error() and good.content["logits"]["from_1"].numpy().shape == (4, 10)


def test_unknown_action_is_refused(node: LiveNode) -> None:
    """Flower turns this exception into an error reply for the server."""
    with pytest.raises(ValueError, match="No query function registered with name 'teleport'"):
        node.send("query.teleport", {"config": node.config()})
    assert not node.send("query.expert", features()).has_error()


def test_good_route_after_bad_ones(node: LiveNode) -> None:
    reply = node.send("query.route", route_config(node))
    assert not reply.has_error()
    for key, value in reply.content["features"].items():
        assert key.startswith("to_") and value.numpy().shape[1] == FEATURE_DIM


def test_coalesced_query_answers_each_split_in_order(node: LiveNode) -> None:
    """One query over `test,global,test` reports per split (in order) what that split alone holds."""
    from nmoe.data import federation_spec, load_client_data

    data, _ = load_client_data(federation_spec(node.cfg), 0, NUM_PARTITIONS)
    routed = node.send(
        "query.route", route_config(node, **{"query-id": "multi", "split": "test,global,test"})
    )
    assert not routed.has_error(), routed.error.reason if routed.has_error() else ""
    sizes = [len(data.test_y), len(data.global_y), len(data.test_y)]
    for key, value in routed.content["features"].items():
        assert value.numpy().shape[0] <= sum(sizes), key
    remote = ",".join(key[3:] for key in routed.content["features"])
    combined = node.send(
        "query.combine",
        {
            "logits": ArrayRecord(),
            "config": node.config(
                **{
                    "query-id": "multi",
                    "mode": "infer",
                    "failed": remote,
                    "return-predictions": True,
                }
            ),
        },
    )
    assert not combined.has_error(), combined.error.reason if combined.has_error() else ""
    metrics = combined.content["metrics"]
    assert metrics["segments"] == 3 and metrics["num-examples"] == sum(sizes)
    for i, labels in enumerate([data.test_y, data.global_y, data.test_y]):
        predictions = np.array(metrics[f"predictions.{i}"])
        assert metrics[f"num-examples.{i}"] == len(labels) == len(predictions)
        assert metrics[f"accuracy.{i}"] == pytest.approx(
            float((predictions == labels.numpy()).mean())
        )
        assert sum(metrics[f"route-counts.{i}"]) >= len(
            labels
        )  # every sample went to at least one expert


def test_cache_query_takes_one_split(node: LiveNode) -> None:
    reply = node.send("query.route", route_config(node, mode="cache", split="gate,test"))
    assert reply.has_error() and "exactly one split" in reply.error.reason


def test_local_first_samples_never_leave_the_device(tmp_path: Path, task_identity: None) -> None:
    """With gate.local_first_quantile, samples close to the client's own training features are answered
    by its own expert and no feature row of theirs is sent; the others are routed as before."""
    import torch

    from nmoe.data import federation_spec, load_client_data
    from nmoe.models import build_expert, load_numpy

    quantile = 0.5
    live = LiveNode(tmp_path, [f"gate.local_first_quantile={quantile}"])
    assert not live.send("query.info", {"config": live.config()}).has_error()
    assert not live.send(
        "train.expert", {"arrays": live.bundle, "config": live.config(**{"own-head": False})}
    ).has_error()
    own_training = live.send(
        "query.route", route_config(live, **{"query-id": "own", "split": "train"})
    )
    assert (
        not own_training.has_error() and len(own_training.content["features"]) == 0
    )  # all familiar: nothing sent
    routed = live.send("query.route", route_config(live, **{"query-id": "lf", "split": "global"}))
    assert not routed.has_error(), routed.error.reason if routed.has_error() else ""

    data, classes = load_client_data(federation_spec(live.cfg), 0, NUM_PARTITIONS)
    fe = build_bundle(live.cfg.model, (1, 8, 8), classes, 0).fe  # the F the node received
    with torch.no_grad():
        feats, own_feats = fe(data.global_x), fe(data.train_x)
    among_own = torch.cdist(own_feats, own_feats).fill_diagonal_(float("inf")).min(dim=1).values
    close = torch.cdist(feats, own_feats).min(dim=1).values <= torch.quantile(among_own, quantile)
    assert 0 < int(close.sum()) < len(close), "the test needs both kinds of samples"
    sent = [
        row
        for value in routed.content["features"].values()
        for row in torch.from_numpy(value.numpy())
    ]
    assert sent, "unfamiliar samples are still routed"
    for row in sent:
        matches = (feats - row).abs().amax(dim=1) < 1e-5
        assert matches.any() and not (matches & close).any(), (
            "a familiar sample's features left the device"
        )

    remote = ",".join(key[3:] for key in routed.content["features"])
    combined = live.send(
        "query.combine",
        {
            "logits": ArrayRecord(),
            "config": live.config(
                **{"query-id": "lf", "mode": "infer", "failed": remote, "return-predictions": True}
            ),
        },
    )
    metrics = combined.content["metrics"]
    assert metrics["answered-locally.0"] >= int(close.sum())
    expert = build_expert(live.cfg.model, classes, 0)
    load_numpy(expert, {k: v.numpy() for k, v in live.context.state["model/expert"].items()})
    with torch.no_grad():
        own_predictions = expert(feats[close]).argmax(dim=1)
    assert torch.equal(torch.tensor(metrics["predictions.0"])[close], own_predictions)


def test_personal_expert_starts_from_the_shared_expert(tmp_path: Path, task_identity: None) -> None:
    """expert-init=shared: the personal expert is the installed shared expert, fine-tuned (with a
    vanishing learning rate it stays the shared expert); expert-init=none trains no expert."""
    from nmoe.models import build_expert

    live = LiveNode(
        tmp_path, ["expert=with_shared", "expert.init_from_shared=true", "expert.lr=1e-12"]
    )
    assert not live.send("query.info", {"config": live.config()}).has_error()
    skipped = live.send(
        "train.expert",
        {
            "arrays": live.bundle,
            "config": live.config(**{"own-head": False, "expert-init": "none"}),
        },
    )
    assert not skipped.has_error() and "model/expert" not in live.context.state.array_records
    shared = state_numpy(build_expert(live.cfg.model, 10, 321))
    installed = live.send(
        "train.shared_expert",
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
            "config": live.config(install=True, **{"server-round": 0}),
        },
    )
    assert not installed.has_error()
    trained = live.send(
        "train.expert", {"config": live.config(**{"own-head": False, "expert-init": "shared"})}
    )
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    personal = {k: v.numpy() for k, v in live.context.state["model/expert"].items()}
    assert personal.keys() == shared.keys()
    for key, value in shared.items():
        np.testing.assert_allclose(personal[key], value, atol=1e-6, err_msg=key)
