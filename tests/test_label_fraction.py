"""`dataset.label_fraction` through every handler of a real ClientApp (in-process).

The device holds its own data-dir in which 80% of the training images carry label -1: any
supervised step that read one of those labels would fail (cross entropy refuses -1), so every
handler completing proves that CE, experts, gates and baselines train on labelled images only,
and the replies' example counts show which images each part used: FedSC and hybrid every image,
everything supervised the labelled ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from nmoe.config import compose_config
from nmoe.data import federation_spec, load_client_data
from nmoe.datasets import DATASETS
from nmoe.device_data import write_device_data
from nmoe.models import build_bundle, stage1_keys, state_numpy
from nmoe_protocol import messages as wire

from .live import IMAGE_SHAPE, NUM_PARTITIONS, LiveNode

FRACTION = 0.2
OVERRIDES = [
    f"dataset.label_fraction={FRACTION}",
    "fe.local_epochs=1",
    "baseline.epochs=2",
    "expert.epochs=2",
    "fe.patience=2",
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, module_task_identity: None) -> LiveNode:
    cfg = compose_config(["experiment=smoke", *OVERRIDES])
    client, _ = load_client_data(federation_spec(cfg), 0, NUM_PARTITIONS)
    data_dir = tmp_path_factory.mktemp("device") / "data"
    write_device_data(data_dir, client, DATASETS["digits"], label_fraction=FRACTION)
    live = LiveNode(
        tmp_path_factory.mktemp("state"), OVERRIDES, node_config={"data-dir": str(data_dir)}
    )
    reply = live.send(wire.SetupRequest(config_json=live.cfg_json))
    assert not reply.has_error(), reply.error.reason
    live.info = wire.NodeInfo.from_message(reply)  # type: ignore[attr-defined]
    return live


def _ok(node: LiveNode, request: wire.WireMessage, reply_type: type) -> object:
    reply = node.send(request)
    assert not reply.has_error(), f"{request.TYPE}: {reply.error.reason}"
    return reply_type.from_message(reply)


def _params(node: LiveNode, method: str) -> dict[str, np.ndarray]:
    bundle = build_bundle(node.cfg.model, IMAGE_SHAPE, 10, 0)
    keys = stage1_keys(bundle, method)
    return {k: v for k, v in state_numpy(bundle).items() if k in keys}


def test_each_part_trains_on_what_the_label_fraction_allows(node: LiveNode) -> None:
    info = node.info  # type: ignore[attr-defined]
    n, n_lab = info.num_train, info.num_labelled
    assert 0 < n_lab < n and n_lab == max(1, round(FRACTION * n))
    held = lambda m: m - max(1, int(m * float(node.cfg.fe.val_fraction)))
    counts = {}
    for method in ("fedce", "fedsc", "hybrid"):
        request = wire.ExtractorRequest(method=method, server_round=1, params=_params(node, method))
        reply = _ok(node, request, wire.ExtractorReply)
        assert np.isfinite(reply.loss) and reply.val_score is not None
        counts[method] = reply.num_examples
        if method == "hybrid":  # CE on the labelled images of each batch, SSL on all of them
            assert reply.ce_loss > 0 and reply.ssl_loss != 0
    assert counts == {"fedce": held(n_lab), "fedsc": held(n), "hybrid": held(n)}
    corr = _ok(
        node,
        wire.CorrelationRequest(server_round=1, params=_params(node, "fedsc")),
        wire.CorrelationReply,
    )
    assert corr.num_examples == held(n)  # the SSL images: every one
    dim = int(node.cfg.model.projector_dim)
    assert corr.correlation["corr"].shape == (dim, dim)
    # stage 2 and the baselines: the labelled images only
    _ok(node, wire.InstallRequest(part="fe", params=_params(node, "fedce")), wire.Installed)
    shared = _ok(
        node,
        wire.SharedExpertRequest(server_round=1, params=_expert_params(node)),
        wire.TrainReply,
    )
    assert shared.num_examples == held(n_lab)
    expert = _ok(node, wire.ExpertRequest(init="scratch"), wire.ExpertReply)
    holdout = float(node.cfg.expert.gate_holdout_fraction)
    assert expert.num_examples == n_lab - int(n_lab * holdout)
    assert _ok(node, wire.OwnHeadRequest(), wire.ExpertReply).num_examples == n_lab
    assert _ok(node, wire.LocalOnlyRequest(), wire.Accuracies).num_examples == n_lab


def _expert_params(node: LiveNode) -> dict[str, np.ndarray]:
    from nmoe.models import build_expert

    return state_numpy(build_expert(node.cfg.model, 10, 0))


def test_the_validation_score_is_that_of_the_received_model(node: LiveNode) -> None:
    """Early stopping keeps the aggregate that validates best, so a client scores the
    parameters it received, before its local update: two rounds with the same parameters but a
    different local update (the round seeds the batches) report the same score."""
    for method in ("fedce", "fedsc"):
        replies = [
            _ok(
                node,
                wire.ExtractorRequest(
                    method=method, server_round=rnd, params=_params(node, method)
                ),
                wire.ExtractorReply,
            )
            for rnd in (1, 2)
        ]
        assert replies[0].loss != replies[1].loss  # the local updates differ
        assert replies[0].val_score == replies[1].val_score is not None
    _ok(node, wire.InstallRequest(part="fe", params=_params(node, "fedce")), wire.Installed)
    shared = [
        _ok(
            node,
            wire.SharedExpertRequest(server_round=rnd, params=_expert_params(node)),
            wire.TrainReply,
        )
        for rnd in (1, 2)
    ]
    assert shared[0].loss != shared[1].loss
    assert shared[0].val_score == shared[1].val_score is not None


@pytest.mark.usefixtures("task_identity")
def test_without_a_patience_rule_no_validation_score_is_sent(tmp_path) -> None:
    """`fe.patience=0` holds no validation part out: stage 1 and H_0 train and send no score."""
    live = LiveNode(tmp_path, ["fe.patience=0", "fe.local_epochs=1", "expert.epochs=1"])
    reply = live.send(wire.SetupRequest(config_json=live.cfg_json))
    assert not reply.has_error(), reply.error.reason
    stage1 = _ok(
        live,
        wire.ExtractorRequest(method="fedce", server_round=1, params=_params(live, "fedce")),
        wire.ExtractorReply,
    )
    assert np.isfinite(stage1.loss) and stage1.val_score is None
    _ok(live, wire.InstallRequest(part="fe", params=_params(live, "fedce")), wire.Installed)
    shared = _ok(
        live,
        wire.SharedExpertRequest(server_round=1, params=_expert_params(live)),
        wire.TrainReply,
    )
    assert np.isfinite(shared.loss) and shared.val_score is None
