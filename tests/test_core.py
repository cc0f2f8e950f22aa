"""Strategy aggregation, routing and combination, data split determinism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from nmoe.config import ConfigError, compose_config
from nmoe.data import federation_spec, load_all_clients, load_client_data
from nmoe.pipeline import assemble, local_logits, plan_route
from nmoe.routing import (
    answer_locally,
    combine,
    familiar,
    nearest_distances,
    random_weights,
    topk_weights,
)
from nmoe_protocol.messages import TrainReply
from nmoe_strategy.strategy import SharedKeyStrategy

RNG = np.random.default_rng(0)


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _reply(
    pid: int, arrays: dict[str, np.ndarray], num_examples: int
) -> tuple[Message, TrainReply]:
    request = Message(RecordDict(), dst_node_id=pid + 1, message_type="train.extractor")
    reply = TrainReply(params=arrays, num_examples=num_examples, loss=float(pid + 1))
    return Message(reply.to_content(), reply_to=request), reply


def test_strategy_averages_exactly_the_shared_keys() -> None:
    counts = [10, 30, 60]
    shared = {
        f"fe.w{i}": [RNG.normal(size=(3, 4)).astype(np.float32) for _ in counts] for i in range(2)
    }
    personal = [RNG.normal(size=(5,)).astype(np.float32) for _ in counts]
    replies = {
        n: _reply(
            n, {**{k: v[n] for k, v in shared.items()}, "net.0.weight": personal[n]}, counts[n]
        )
        for n in range(len(counts))
    }
    reference = {k: v[0] for k, v in shared.items()}
    outcome = SharedKeyStrategy().aggregate(1, replies, list(shared), reference)
    assert (
        outcome.params is not None and set(outcome.params) == set(shared) and not outcome.rejected
    )
    for key, values in shared.items():
        expected = sum(c * v for c, v in zip(counts, values, strict=True)) / sum(counts)
        np.testing.assert_allclose(outcome.params[key], expected, rtol=1e-6)
    assert outcome.metrics["loss"] == pytest.approx(
        sum(c * (i + 1) for i, c in enumerate(counts)) / sum(counts)
    )


def test_strategy_aggregates_replies_that_report_different_optional_metrics() -> None:
    """At label fraction 0.02 a client may hold no labelled validation image and report no
    val_score: the round still aggregates (Flower's FedAvg refuses metric records whose keys
    differ), averaging the metrics every reply reports."""
    reference = {"fe.a": np.zeros(2, np.float32)}
    replies = {pid: _reply(pid, {"fe.a": np.full(2, pid, np.float32)}, 10) for pid in range(3)}
    for pid in (0, 2):  # client 1 held no labelled validation image
        message, reply = replies[pid]
        replies[pid] = message, dataclasses.replace(reply, val_score=-0.5 - pid)
    outcome = SharedKeyStrategy().aggregate(1, replies, ["fe.a"], reference)
    assert not outcome.rejected
    np.testing.assert_allclose(outcome.params["fe.a"], np.ones(2))
    assert outcome.metrics["loss"] == pytest.approx(2.0) and "val_score" not in outcome.metrics


def test_strategy_refuses_reply_missing_a_shared_key() -> None:
    reference = {"fe.a": np.ones(2, np.float32)}
    replies = {
        0: _reply(0, {"fe.a": np.ones(2, np.float32)}, 5),
        1: _reply(1, {"fe.b": np.ones(2, np.float32)}, 5),
    }
    outcome = SharedKeyStrategy().aggregate(1, replies, ["fe.a"], reference)
    assert "lacks shared keys" in outcome.rejected[1] and 0 not in outcome.rejected
    np.testing.assert_allclose(outcome.params["fe.a"], np.ones(2))


def test_strategy_reply_fraction() -> None:
    strategy = SharedKeyStrategy(min_reply_fraction=0.5)
    assert strategy.enough_replies(3, 6) and not strategy.enough_replies(2, 6)


def test_topk_selects_best_reachable_and_softmaxes() -> None:
    scores = torch.tensor([[5.0, 4.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]])
    reachable = torch.tensor([False, True, True, True])  # expert 0 masked despite the top score
    weights = topk_weights(scores, reachable, k=2)
    assert weights[:, 0].eq(0).all()
    expected_row0 = torch.softmax(torch.tensor([4.0, 1.0]), 0)
    torch.testing.assert_close(weights[0, 1:3], expected_row0)
    torch.testing.assert_close(weights[1, 2:4], torch.softmax(torch.tensor([3.0, 2.0]), 0))
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_masked_experts_never_chosen_even_with_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    reachable = torch.tensor([True, False, True, False, True, False])
    for _ in range(50):
        scores = torch.randn(64, 6, generator=generator) * 10
        assert (
            topk_weights(scores, reachable, 3, noise_std=5.0, generator=generator)[:, ~reachable]
            .eq(0)
            .all()
        )
        rand = random_weights(64, reachable, 2, generator)
        assert rand[:, ~reachable].eq(0).all() and torch.allclose(rand.sum(1), torch.ones(64))


def test_k_larger_than_neighbourhood_is_an_error() -> None:
    with pytest.raises(ValueError, match="larger than the neighbourhood"):
        topk_weights(torch.zeros(2, 4), torch.tensor([True, True, False, False]), 3)


def test_combination_equals_weighted_sum_of_expert_probabilities() -> None:
    """The routed pieces reassembled on the requester equal sum_j w_j softmax(H_j(h)) computed
    locally."""
    torch.manual_seed(0)
    feats = torch.randn(16, 8)
    experts = [torch.nn.Linear(8, 5) for _ in range(4)]
    weights = topk_weights(torch.randn(16, 4), torch.ones(4, dtype=torch.bool), 2)
    own = 1
    plan = plan_route(weights, local_logits(feats, {own: experts[own]}))
    remote = {e: experts[e](feats[index]).detach() for e, index in plan.remote_index.items()}
    logits, answered = assemble(plan, remote, 5)
    combined, degraded = combine(weights, logits, answered, fallback=own)
    with torch.no_grad():
        direct = sum(weights[:, j : j + 1] * torch.softmax(experts[j](feats), 1) for j in range(4))
    torch.testing.assert_close(combined, direct)
    assert not degraded.any()


def test_local_first_keeps_familiar_samples_on_the_own_expert() -> None:
    """Familiar = within the quantile of the own training features' nearest-neighbour distances;
    those samples go to the own expert alone, the others keep their gate weights."""
    own_feats = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]
    )  # leave-one-out NN distances 1, 1, 2
    queries = torch.tensor(
        [[0.5, 0.0], [3.0, 1.5], [10.0, 0.0], [1.0, 0.9]]
    )  # NN distances 0.5, 1.5, 7, 0.9
    assert familiar(queries, own_feats, 0.5).tolist() == [True, False, False, True]  # radius 1
    assert familiar(queries, own_feats, 1.0).tolist() == [True, True, False, True]  # radius 2
    assert not familiar(
        queries, own_feats[:1], 1.0
    ).any()  # one own sample: no radius, nothing familiar
    weights = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.0, 0.8], [0.0, 0.0, 1.0], [0.3, 0.7, 0.0]])
    local = torch.tensor([True, False, True, False])
    out = answer_locally(weights, own=1, local=local)
    torch.testing.assert_close(out[local], torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(out[~local], weights[~local])
    assert weights[0, 1] == 0.5  # the input is not modified


def test_failed_expert_renormalises_and_falls_back_to_own() -> None:
    weights = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.0, 1.0]])
    # expert j is sure of class j
    logits = torch.stack([torch.eye(3)[j].expand(2, 3) * 20 for j in range(3)], dim=1)
    answered = torch.tensor([[True, True, False], [True, True, False]])  # expert 2 failed
    combined, degraded = combine(weights, logits, answered, fallback=0)
    assert combined[0].argmax() == 1 and combined[0, 1] > 0.99  # all weight on expert 1
    assert combined[1].argmax() == 0 and combined[1, 0] > 0.99  # nothing left: own expert 0
    torch.testing.assert_close(combined.sum(1), torch.ones(2))
    assert degraded.tolist() == [True, True]


def test_partitions_are_deterministic_disjoint_and_global_test_balanced() -> None:
    cfg = compose_config(["partition=dirichlet", "partition.alpha=0.3"])
    spec = federation_spec(cfg)
    clients = load_all_clients(spec, 6)
    again, classes = load_client_data(spec, 2, 6)
    assert classes == 10
    torch.testing.assert_close(again.train_x, clients[2].train_x)
    counts = torch.bincount(clients[0].global_y, minlength=10)
    assert counts.min() == counts.max() > 0
    sizes = [len(c.train_y) + len(c.test_y) for c in clients]
    assert sum(sizes) + len(clients[0].global_y) == 1797
    label_shares = [
        torch.bincount(c.train_y, minlength=10).float() / len(c.train_y) for c in clients
    ]
    assert max(float(s.max()) for s in label_shares) > 0.4  # alpha 0.3 is visibly skewed


def test_cached_split_is_the_same_split_without_repartitioning(tmp_path: Path) -> None:
    """A deployed node keeps its split on disk: the next process reads it back unchanged and
    never loads or partitions the dataset."""
    from nmoe import data

    spec = federation_spec(compose_config(["partition=dirichlet"]))
    first, classes = load_client_data(spec, 1, 4, tmp_path)
    assert len(list(tmp_path.glob("split-*-partition-1.npz"))) == 1
    data._federation.cache_clear()
    cached, cached_classes = load_client_data(spec, 1, 4, tmp_path)
    assert data._federation.cache_info().currsize == 0
    assert cached_classes == classes == 10
    for name in data.CLIENT_DATA_FIELDS:
        assert torch.equal(getattr(cached, name), getattr(first, name)), name
    other, _ = load_client_data(federation_spec(compose_config(["partition=iid"])), 1, 4, tmp_path)
    assert not torch.equal(other.train_y, first.train_y)  # another data config, another cache file


def test_partition_id_out_of_range() -> None:
    spec = federation_spec(compose_config([]))
    with pytest.raises(ValueError, match="partition-id 6"):
        load_client_data(spec, 6, 6)


@pytest.mark.parametrize(
    "override,key",
    [
        ("fe.rounds=0", "fe.rounds"),
        ("partition.alpha=0", "partition.alpha"),
        ("gate.k=-1", "gate.k"),
        ("baselines=[fedprox]", "baselines"),
        ("fe.method=fedfoo", "fe.method"),
        ("dataset.name=mnist", "dataset.name"),
        ("expert.epochs=0", "expert.epochs"),
        ("gate.local_first_quantile=1.5", "gate.local_first_quantile"),
        ("expert.init_from_shared=true", "expert.init_from_shared"),  # needs expert=with_shared
        ("model.cnn_stride=0", "model.cnn_stride"),
    ],
)
def test_invalid_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        compose_config([override])


def test_cnn_stride_downsamples_before_the_second_layer_and_keeps_the_parameters() -> None:
    """The Fashion-MNIST panel's stride 2: the second conv sees a 14x14 map of a 28x28 image, the
    features keep their size and the parameters their shapes (a shared F is the same keys)."""
    from nmoe.models import build_extractor

    plain_cfg = compose_config(["experiment=panel_digits"]).model
    strided_cfg = compose_config(["experiment=panel_fashion_mnist"]).model
    assert (plain_cfg.cnn_stride, strided_cfg.cnn_stride) == (1, 2)
    plain, strided = (
        build_extractor(plain_cfg, (1, 28, 28)),
        build_extractor(strided_cfg, (1, 28, 28)),
    )
    x = torch.randn(3, 1, 28, 28)
    assert strided.conv[:2](x).shape == (3, 16, 14, 14)
    assert plain.conv[:2](x).shape == (3, 16, 28, 28)
    assert strided(x).shape == plain(x).shape == (3, int(plain_cfg.feature_dim))
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
    assert shapes(strided) == shapes(plain)


def test_gate_with_k1_still_learns() -> None:
    """k = 1: a top-1 softmax is constant; training uses the Switch-style weight and the gate
    moves."""
    from nmoe.models import build_gate
    from nmoe.training import train_gate

    torch.manual_seed(0)
    n, experts, classes, dim = 256, 4, 5, 8
    feats, labels = torch.randn(n, dim), torch.randint(0, classes, (n,))
    logits = torch.randn(n, experts, classes)
    logits[torch.arange(n), 2, labels] = 8.0  # expert 2 is right everywhere
    gate = build_gate(type("M", (), {"feature_dim": dim, "gate_hidden": 16})(), experts, 0)
    before = [p.detach().clone() for p in gate.parameters()]
    reachable = torch.ones(experts, dtype=torch.bool)
    train_gate(
        gate,
        feats,
        labels,
        logits,
        reachable,
        k=1,
        noise_std=0.5,
        epochs=20,
        lr=0.05,
        batch_size=32,
        seed=0,
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, gate.parameters(), strict=True))
    with torch.no_grad():
        chosen = topk_weights(gate(feats), reachable, 1).argmax(dim=1)
    assert float((chosen == 2).float().mean()) > 0.9


def test_nearest_distances_in_chunks_match_the_full_matrix() -> None:
    torch.manual_seed(0)
    reference, queries = torch.randn(50, 8), torch.randn(30, 8)
    full = torch.cdist(queries, reference).min(dim=1).values
    torch.testing.assert_close(nearest_distances(queries, reference, chunk=7), full)
    among = torch.cdist(reference, reference).fill_diagonal_(float("inf")).min(dim=1).values
    torch.testing.assert_close(
        nearest_distances(reference, reference, exclude_self=True, chunk=7), among
    )


def test_oracle_router_answers_right_iff_some_reachable_expert_is_right() -> None:
    """The oracle's ceiling: one expert per sample, right whenever any answered expert is right."""
    from nmoe.pipeline import PendingQuery, RoutePlan, finish_query

    torch.manual_seed(0)
    n, experts, classes = 200, 4, 5
    labels = torch.randint(0, classes, (n,))
    logits = torch.randn(n, experts, classes) * 3
    reachable = torch.tensor([True, True, True, False])  # expert 3 never answers
    logits[:, 3] = torch.nn.functional.one_hot(labels, classes).float() * 100  # always right
    weights = reachable.float().expand(n, -1).clone()
    plan = RoutePlan(weights, {e: logits[:, e] for e in range(3)}, {})
    (report,) = finish_query(PendingQuery(plan, labels, [n], "oracle"), {}, classes, own=0)
    any_right = (logits[:, :3].argmax(dim=2) == labels.view(-1, 1)).any(dim=1)
    assert report.accuracy == pytest.approx(float(any_right.float().mean()))
    assert 0 < report.accuracy < 1
    assert all(report.route_counts[e] >= 0 for e in range(3)) and report.route_counts[3] == 0
    assert sum(report.route_counts) == n  # exactly one expert per sample


def test_patience_stops_after_rounds_without_improvement() -> None:
    from nmoe.convergence import Patience

    rule = Patience(patience=2, min_delta=0.01)
    scores = [0.5, 0.6, 0.605, 0.7, 0.7, 0.69, 0.9]
    stopped_at = None
    for step, score in enumerate(scores, start=1):
        rule.update(step, score)
        if rule.stop:
            stopped_at = step
            break
    assert stopped_at == 6 and rule.best_step == 4 and rule.best == 0.7
    never = Patience(patience=0)
    for step in range(1, 50):
        never.update(step, 0.1)
    assert not never.stop and never.best_step == 1


def test_patience_restored_from_its_checkpoint_keeps_history_and_decisions(tmp_path) -> None:
    """A rule saved mid-way (as a checkpoint holds it, through JSON) and restored goes on exactly
    as the uninterrupted one: same history, best step and stop; an old checkpoint without
    history restores with an empty one."""
    import json

    from nmoe.convergence import Patience

    scores = [0.5, 0.6, 0.605, 0.7, 0.7, 0.69, 0.68, 0.9]
    whole = Patience(patience=3, min_delta=0.01)
    first = Patience(patience=3, min_delta=0.01)
    for step, score in enumerate(scores[:3], start=1):
        whole.update(step, score)
        first.update(step, score)
    saved = json.loads(json.dumps(first.as_dict()))
    resumed = Patience.restore(3, 0.01, saved)
    for step, score in enumerate(scores[3:], start=4):
        for rule in (whole, resumed):
            rule.update(step, score)
        assert resumed.stop == whole.stop
        if whole.stop:
            break
    assert resumed.history == whole.history == scores[:7]
    assert (resumed.best, resumed.best_step, resumed.waited) == (0.7, 4, 3)
    old = {k: v for k, v in saved.items() if k != "history"}
    assert Patience.restore(3, 0.01, old).history == []
