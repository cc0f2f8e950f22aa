"""Every bad input to a live ClientApp gets an error reply naming the reason; the node keeps
serving and its state (in memory and on disk) is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from nmoe.models import build_bundle, stage1_keys, state_numpy
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import WireMessage

from . import live

NUM_PARTITIONS = live.NUM_PARTITIONS
MAX_BATCH = 50
FEATURE_DIM = live.FEATURE_DIM


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class LiveNode(live.LiveNode):
    """A simulated node with plaintext peer payloads: the checks on the arrays themselves."""

    def __init__(
        self,
        state_dir: Path,
        overrides: list[str] | None = None,
        node_config: dict | None = None,
    ) -> None:
        super().__init__(
            state_dir,
            [
                f"max_query_batch={MAX_BATCH}",
                "state_key=bad-input",
                "seal_payloads=false",
                *(overrides or []),
            ],
            node_config,
        )


def features(
    rows: int = 4, dim: int = FEATURE_DIM, dtype=np.float32, fill: float | None = None
) -> wire.ExpertQuery:
    value = np.random.default_rng(0).normal(size=(rows, dim)).astype(dtype)
    if fill is not None and rows:
        value[0, 0] = fill
    return wire.ExpertQuery(query_id="q", batches={1: value})


route = live.route_request


def raw(request: WireMessage, drop: str | None = None, **extra) -> tuple[str, RecordDict]:
    """The request's content without its checks, minus the field `drop`, plus `extra` keys."""
    content = request.to_content(validate=False)
    config = dict(content["config"]) if "config" in content else {}
    config.pop(drop, None)
    config.update(extra)
    content["config"] = ConfigRecord(config)
    return request.TYPE, content


def bad_params(
    node: LiveNode, change: Callable[[dict], None], keys: list[str] | None = None
) -> dict:
    """The initial bundle (every key, or `keys`), altered by `change`."""
    bundle = state_numpy(build_bundle(node.cfg.model, (1, 8, 8), 10, 0))
    arrays = {k: v.copy() for k, v in bundle.items() if keys is None or k in keys}
    change(arrays)
    return arrays


def fedce_keys(node: LiveNode) -> list[str]:
    return list(node.params)


def fedsc_keys(node: LiveNode) -> list[str]:
    bundle = build_bundle(node.cfg.model, (1, 8, 8), 10, 0)
    return stage1_keys(bundle, "fedsc")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, module_task_identity: None) -> LiveNode:
    live = LiveNode(tmp_path_factory.mktemp("state"))
    live.set_up()
    return live


def nan_params(arrays: dict) -> None:
    arrays["head.weight"].fill(np.nan)


BAD_INPUTS: list[tuple[str, Callable[[LiveNode], WireMessage | tuple[str, RecordDict]], str]] = [
    ("wrong shape", lambda n: features(dim=FEATURE_DIM - 1), "shape (4, 63)"),
    (
        "feature dim mismatch, 3-D",
        lambda n: wire.ExpertQuery(
            query_id="q", batches={1: np.zeros((2, 4, FEATURE_DIM), np.float32)}
        ),
        "expected (n, 64)",
    ),
    ("wrong dtype", lambda n: features(dtype=np.float64), "dtype float64"),
    ("NaN", lambda n: features(fill=np.nan), "non-finite"),
    ("Inf", lambda n: features(fill=np.inf), "non-finite"),
    ("empty batch", lambda n: features(rows=0), "empty batch"),
    (
        "batch over the limit",
        lambda n: features(rows=MAX_BATCH + 1),
        f"max_query_batch={MAX_BATCH}",
    ),
    (
        "missing record",
        lambda n: (wire.EXPERT, RecordDict({"config": ConfigRecord({"query_id": "q"})})),
        "missing 'batches'",
    ),
    (
        "k larger than neighbourhood",
        lambda n: route(neighbours=[0]),
        "larger than the neighbourhood",
    ),
    ("missing config key", lambda n: raw(route(), drop="mode"), "missing 'mode'"),
    ("unknown config key", lambda n: raw(route(), k=7), "unknown keys ['k']"),
    ("mistyped config value", lambda n: raw(route(), seed="zero"), "'seed': expected int, got str"),
    (
        "unknown record",
        lambda n: (
            wire.ROUTE,
            RecordDict({**route().to_content(), "sneaky": ConfigRecord({"a": 1})}),
        ),
        "unknown records ['sneaky']",
    ),
    (
        "k not positive in the run config",
        lambda n: wire.SetupRequest(config_json=n.cfg_json.replace('"k": 2', '"k": 0')),
        "config key 'gate.k'",
    ),
    ("unknown mode", lambda n: raw(route(mode="teleport")), "unknown mode 'teleport'"),
    ("unknown split", lambda n: raw(route(splits=["validation"])), "unknown split 'validation'"),
    ("unknown gate", lambda n: route(gate="oracle"), "unknown gate 'oracle'"),
    ("neighbours without self", lambda n: route(neighbours=[1, 2]), "must include the requester"),
    ("neighbour out of range", lambda n: route(neighbours=[0, 7]), "outside [0, 3)"),
    (
        "parameters for unknown keys",
        lambda n: wire.ExtractorRequest(
            method="fedce",
            server_round=1,
            params=bad_params(
                n, lambda a: a.update({"fe.backdoor": np.zeros(3, np.float32)}), fedce_keys(n)
            ),
        ),
        "unknown parameter keys: ['fe.backdoor']",
    ),
    (
        "untrained projector sent to FedCE",
        lambda n: wire.ExtractorRequest(
            method="fedce", server_round=1, params=bad_params(n, lambda a: None)
        ),
        "unknown parameter keys: ['projector.",
    ),
    (
        "shared correlation of the wrong shape",
        lambda n: wire.ExtractorRequest(
            method="fedsc",
            server_round=1,
            params=bad_params(n, lambda a: None, fedsc_keys(n)),
            others_correlation={"corr": np.zeros((3, 3), np.float32)},
            alpha=0.5,
        ),
        "others_correlation must be a finite",
    ),
    (
        "non-finite shared correlation",
        lambda n: wire.ExtractorRequest(
            method="fedsc",
            server_round=1,
            params=bad_params(n, lambda a: None, fedsc_keys(n)),
            others_correlation={
                "corr": np.full((n.cfg.model.projector_dim,) * 2, np.nan, np.float32)
            },
            alpha=0.5,
        ),
        "others_correlation must be a finite",
    ),
    (
        "parameter shape mismatch",
        lambda n: wire.ExtractorRequest(
            method="fedce",
            server_round=1,
            params=bad_params(
                n, lambda a: a.update({"head.bias": np.zeros(11, np.float32)}), fedce_keys(n)
            ),
        ),
        "shape mismatch for 'head.bias'",
    ),
    (
        "NaN parameters",
        lambda n: wire.InstallRequest(part="fe", params=bad_params(n, nan_params, fedce_keys(n))),
        "non-finite values",
    ),
    (
        "missing parameter keys",
        lambda n: wire.InstallRequest(
            part="fe", params=bad_params(n, lambda a: a.pop("head.bias"), fedce_keys(n))
        ),
        "missing parameter keys",
    ),
    (
        "untrainable gate",
        lambda n: wire.GateRequest(gate="rangate", server_round=1, params={}),
        "not trainable",
    ),
    (
        "unknown expert init",
        lambda n: raw(wire.ExpertRequest(init="pretrained")),
        "unknown expert init 'pretrained'",
    ),
    (
        "combine for an unknown query",
        lambda n: wire.CombineRequest(query_id="nope", logits={}),
        "no 'scratch/pending.nope'",
    ),
]


@pytest.mark.parametrize("case,request_of,reason", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_error_reply_and_node_keeps_serving(
    node: LiveNode, case, request_of, reason
) -> None:
    before = node.snapshot()
    reply = node.send(request_of(node))
    assert reply.has_error(), f"{case}: accepted"
    assert reason in str(reply.error.reason), reply.error.reason
    assert node.snapshot() == before, f"{case}: state changed"
    good = node.send(features())
    assert not good.has_error() and good.content["logits"]["1"].numpy().shape == (4, 10)


def test_unknown_action_is_refused(node: LiveNode) -> None:
    """Flower turns this exception into an error reply for the server."""
    with pytest.raises(ValueError, match="No query function registered with name 'teleport'"):
        node.send(("query.teleport", RecordDict()))
    assert not node.send(features()).has_error()


def test_good_route_after_bad_ones(node: LiveNode) -> None:
    reply = node.send(route())
    assert not reply.has_error()
    decoded = wire.RouteReply.from_message(reply)
    for expert, value in decoded.features.items():
        assert expert in (1, 2) and value.shape[1] == FEATURE_DIM


def test_coalesced_query_answers_each_split_in_order(node: LiveNode) -> None:
    """One query over `test,global,test` reports per split (in order) what that split alone
    holds."""
    from nmoe.data import federation_spec, load_client_data

    data, _ = load_client_data(federation_spec(node.cfg), 0, NUM_PARTITIONS)
    routed = node.send(route(query_id="multi", splits=["test", "global", "test"]))
    assert not routed.has_error(), routed.error.reason if routed.has_error() else ""
    sizes = [len(data.test_y), len(data.global_y), len(data.test_y)]
    for value in wire.RouteReply.from_message(routed).features.values():
        assert value.shape[0] <= sum(sizes)
    combined = node.send(wire.CombineRequest(query_id="multi", logits={}, return_predictions=True))
    assert not combined.has_error(), combined.error.reason if combined.has_error() else ""
    report = wire.CombineReply.from_message(combined)
    assert report.num_examples == sizes
    for i, labels in enumerate([data.test_y, data.global_y, data.test_y]):
        predictions = np.array(report.predictions_of(i))
        assert len(predictions) == len(labels)
        assert report.accuracy[i] == pytest.approx(float((predictions == labels.numpy()).mean()))
        assert sum(report.route_counts_of(i)) >= len(labels)  # every sample went to an expert


def test_cache_query_takes_one_split(node: LiveNode) -> None:
    reply = node.send(raw(route(mode="cache", splits=["gate", "test"])))
    assert reply.has_error() and "exactly one split" in reply.error.reason


def test_local_first_samples_never_leave_the_device(tmp_path: Path, task_identity: None) -> None:
    """With gate.local_first_quantile, samples close to the client's own training features are
    answered by its own expert and no feature row of theirs is sent; the others are routed."""
    import torch

    from nmoe.data import federation_spec, load_client_data
    from nmoe.models import build_expert, load_numpy

    quantile = 0.5
    live = LiveNode(tmp_path, [f"gate.local_first_quantile={quantile}"])
    live.set_up()
    own_training = live.send(route(query_id="own", splits=["train"]))
    assert not own_training.has_error()
    assert not wire.RouteReply.from_message(own_training).features  # all familiar: nothing sent
    routed = live.send(route(query_id="lf", splits=["global"]))
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
        for value in wire.RouteReply.from_message(routed).features.values()
        for row in torch.from_numpy(value)
    ]
    assert sent, "unfamiliar samples are still routed"
    for row in sent:
        matches = (feats - row).abs().amax(dim=1) < 1e-5
        assert matches.any() and not (matches & close).any(), "a familiar sample's features left"

    combined = live.send(wire.CombineRequest(query_id="lf", logits={}, return_predictions=True))
    report = wire.CombineReply.from_message(combined)
    assert report.answered_locally[0] >= int(close.sum())
    expert = build_expert(live.cfg.model, classes, 0)
    load_numpy(expert, {k: v.numpy() for k, v in live.context.state["model/expert"].items()})
    with torch.no_grad():
        own_predictions = expert(feats[close]).argmax(dim=1)
    assert torch.equal(torch.tensor(report.predictions_of(0))[close], own_predictions)


def test_the_class_check_sends_familiar_rows_of_classes_the_own_expert_lacks(
    tmp_path: Path, task_identity: None
) -> None:
    """gate.local_first_class_confidence on a real ClientApp: the own training rows, all familiar,
    stay on the device without the check; with a check that every class fails (fewer than a
    million own images of it) they go to the gate; a node whose owner sets `min-local-first`
    keeps the rows within that floor, check or not (the node owns its privacy rule)."""
    overrides = ["gate.local_first_quantile=0.5"]
    checked = ["gate.local_first_class_confidence=0.01", "gate.local_first_class_min=1000000"]
    sent_rows = {}
    cases = {
        "plain": ([], {}),
        "checked": (checked, {}),
        "floor": (checked, {"min-local-first": 0.5}),
    }
    for name, (extra, node_config) in cases.items():
        live = LiveNode(tmp_path / name, overrides + extra, node_config=node_config)
        live.set_up()
        reply = live.send(route(query_id="own", splits=["train"]))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        features = wire.RouteReply.from_message(reply).features
        sent_rows[name] = sum(len(v) for v in features.values())
    assert sent_rows["plain"] == 0
    assert sent_rows["checked"] > 0
    assert sent_rows["floor"] == 0


def test_personal_expert_starts_from_the_shared_expert(tmp_path: Path, task_identity: None) -> None:
    """init=shared: the personal expert is the installed shared expert, fine-tuned (with a
    vanishing learning rate it stays the shared expert)."""
    from nmoe.models import build_expert

    live = LiveNode(
        tmp_path, ["expert=with_shared", "expert.init_from_shared=true", "expert.lr=1e-6"]
    )
    for request in (
        wire.SetupRequest(config_json=live.cfg_json),
        wire.InstallRequest(part="fe", params=live.params),
    ):
        assert not live.send(request).has_error()
    assert "model/expert" not in live.context.state.array_records
    shared = state_numpy(build_expert(live.cfg.model, 10, 321))
    installed = live.send(wire.InstallRequest(part="shared_expert", params=shared))
    assert not installed.has_error()
    trained = live.send(wire.ExpertRequest(init="shared"))
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    personal = {k: v.numpy() for k, v in live.context.state["model/expert"].items()}
    assert personal.keys() == shared.keys()
    for key, value in shared.items():
        np.testing.assert_allclose(personal[key], value, atol=1e-3, err_msg=key)
