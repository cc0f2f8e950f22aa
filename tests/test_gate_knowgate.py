"""KnowGate's guarantee on a constructed case: three personal experts that each know two classes
(disjoint), and a shared expert that knows all eight. Real experts, trained; real familiarity,
measured by each owner on its own features; the gate's real reweighting and the real combine."""

from __future__ import annotations

import pytest
import torch

from nmoe.config import compose_config
from nmoe.gates import get
from nmoe.models import build_expert
from nmoe.pipeline import apply_prior_shift
from nmoe.routing import combine, familiarity
from nmoe.training import train_classifier

NUM_CLASSES = 8
PERSONAL = {0: (0, 1), 1: (2, 3), 2: (4, 5)}  # classes 6 and 7: only the shared expert knows them
SHARED = 3
OWN = 0  # the requester


def cluster_samples(classes: list[int], per_class: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Well separated Gaussian clusters, one per class, in the experts' feature space."""
    g = torch.Generator().manual_seed(seed)
    centres = 6.0 * torch.eye(NUM_CLASSES, 16)
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = centres[y] + 0.5 * torch.randn(len(y), 16, generator=g)
    return x, y


# the configured default (the shared expert competes for every row) and the shared expert for
# the unknown rows only (the options of the self-supervision benchmark, conf/experiment/ssl_bench)
SHARED_RATIOS = {
    "default": [],
    "unknown-only": ["gate.know_shared_ratio=0", "gate.k=2", "gate.know_own_bias=1.5"],
}


@pytest.fixture(scope="module", params=list(SHARED_RATIOS))
def world(request) -> dict:
    cfg = compose_config(
        ["experiment=smoke", "gate=knowgate", "expert=with_shared", "model.feature_dim=16"]
        + SHARED_RATIOS[request.param]
    )
    experts, train_x, train_y = {}, {}, {}
    for e, classes in {**PERSONAL, SHARED: tuple(range(NUM_CLASSES))}.items():
        x, y = cluster_samples(list(classes), 40, seed=e)
        expert = build_expert(cfg.model, NUM_CLASSES, seed=e)
        train_classifier(expert, x, y, epochs=60, lr=1e-2, batch_size=32, seed=e)
        experts[e], train_x[e], train_y[e] = expert.eval(), x, y
    test_x, test_y = cluster_samples(list(range(NUM_CLASSES)), 50, seed=99)
    with torch.no_grad():
        logits = torch.stack([experts[e](test_x) for e in sorted(experts)], dim=1)
    ratios = torch.stack(
        [familiarity(test_x, train_x[e], cfg.gate.know_quantile) for e in sorted(experts)], dim=1
    )
    answered = torch.ones(len(test_y), len(experts), dtype=torch.bool)
    gate = get("knowgate")
    weights = gate.reweight(ratios, answered, OWN, SHARED, cfg.gate.k, cfg.gate)
    mixed, _ = combine(weights, logits, answered, fallback=OWN)
    # wave 3 as `finish_query` ends it: the blend towards the task's label prior (on by default,
    # estimated from the test rows: one task), with the labels its own expert trained on
    shift = gate.prior_shift(cfg.gate, train_y[OWN], NUM_CLASSES, SHARED)
    assert shift is not None and (shift.weight, shift.mix) == (0.7, None)
    mixed = apply_prior_shift(mixed, weights, logits, answered, shift, [len(test_y)])
    return {"logits": logits, "weights": weights, "mixed": mixed, "y": test_y, "cfg": cfg}


def test_samples_nobody_knows_get_exactly_the_shared_model(world) -> None:
    unknown = world["y"] >= 6
    assert bool((world["weights"][unknown, SHARED] == 1.0).all())
    shared = torch.softmax(world["logits"][unknown, SHARED], dim=1)
    assert torch.equal(world["mixed"][unknown], shared)


def test_known_samples_go_to_the_experts_that_know_them(world) -> None:
    """A known sample's weight goes to its personal expert or the shared one, which also knows
    it (by default it competes at `know_shared_ratio`; with 0 it answers only the unknown rows,
    and the personal expert takes most known rows); the personal experts that never saw its
    class get little (6% on average with the default `know_shared_ratio` 0.5, 5% at 0.25: the
    shared slot, less eager, leaves the third of the k=3 places a little more weight)."""
    competes = float(world["cfg"].gate.know_shared_ratio) > 0
    for e, classes in PERSONAL.items():
        rows = (world["y"] == classes[0]) | (world["y"] == classes[1])
        weights = world["weights"][rows]
        top = weights.argmax(dim=1)
        assert bool(((top == e) | (top == SHARED)).all()), (e, top.bincount())
        if not competes:
            assert float((top == e).float().mean()) >= 0.5, (e, top.bincount())
        strangers = [j for j in PERSONAL if j != e]
        assert float(weights[:, strangers].sum(dim=1).mean()) < 0.08


def test_the_mixture_is_never_worse_than_the_best_of_its_parts(world) -> None:
    y = world["y"]
    mixed_acc = float((world["mixed"].argmax(dim=1) == y).float().mean())
    parts = [float((world["logits"][:, e].argmax(dim=1) == y).float().mean()) for e in range(4)]
    assert mixed_acc >= max(parts), (mixed_acc, parts)
    # and per sample: wherever the shared expert is right, so is the mixture
    shared_right = world["logits"][:, SHARED].argmax(dim=1) == y
    assert bool((world["mixed"].argmax(dim=1) == y)[shared_right].all())


def test_knowgate_without_a_shared_expert_is_refused() -> None:
    from nmoe.config import ConfigError

    with pytest.raises(ConfigError, match="expert.shared_expert"):
        compose_config(["experiment=smoke", "gate=knowgate"])


@pytest.fixture(scope="module")
def stage1_slot_results(tmp_path_factory) -> dict:
    """A real run (3 simulated clients) whose shared slot is stage 1's model, with a gate that
    finds every sample unknown: every sample goes to the shared slot alone."""
    from .live import simulate

    return simulate(
        tmp_path_factory.mktemp("stage1_slot"),
        [
            "experiment=smoke",
            "gate=knowgate",
            "expert=with_shared",
            "expert.shared_model=stage1",
            "gate.know_max_ratio=1e-9",  # nobody knows anything
            "gate.know_own_share=true",  # ... so no row takes the device's own share either
            "gate.local_first_quantile=0",
            "simulation.num_clients=3",
            "baselines=[fedavg]",
        ],
    )


def test_with_the_stage1_slot_unknown_samples_get_exactly_the_fedavg_model(
    stage1_slot_results,
) -> None:
    """`expert.shared_model=stage1`: the shared slot is stage 1's F + head, which is the `fedavg`
    model under FedCE: samples nobody knows get exactly its answers (per client, both splits),
    and no H_0 is trained (nothing uses it)."""
    results = stage1_slot_results
    assert results["status"] == "completed"
    for key in ("accuracy", "accuracy_global"):
        nmoe, fedavg = results[key]["nmoe"]["per_client"], results[key]["fedavg"]["per_client"]
        assert nmoe == fedavg, (key, nmoe, fedavg)
        own = results[key]["local_expert"]["per_client"]
        assert nmoe != own  # the test can fail: the own experts answer differently
    assert not [row for row in results["history"] if row["stage"] == "shared_expert"]


def test_the_stage1_slot_needs_a_stage1_head() -> None:
    from nmoe.config import ConfigError

    with pytest.raises(ConfigError, match="expert.shared_model"):
        compose_config(
            ["experiment=smoke", "gate=knowgate", "expert=with_shared", "fe=fedsc",
             "expert.shared_model=stage1"]
        )  # fmt: skip
    with pytest.raises(ConfigError, match="expert.shared_model"):
        compose_config(["experiment=smoke", "expert.shared_model=stage1"])


def test_local_first_leaves_rows_of_classes_the_own_expert_never_saw_to_the_gate() -> None:
    """`gate.local_first_class_confidence`: a familiar row still goes to the gate when stage 1's
    head is sure it belongs to a class the own expert trained on fewer than
    `local_first_class_min` images; other familiar rows stay on the own expert."""
    from nmoe.pipeline import plan_query
    from nmoe.routing import local_first_mask, outside_own_classes

    own_labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2: one image; class 3: none
    head_logits = torch.log(
        torch.tensor(
            [
                [0.90, 0.04, 0.03, 0.03],  # sure of class 0 (known): local
                [0.03, 0.03, 0.03, 0.91],  # sure of class 3 (never seen): to the gate
                [0.04, 0.03, 0.90, 0.03],  # sure of class 2 (one image < 3): to the gate
                [0.30, 0.20, 0.20, 0.30],  # unsure: local
            ]
        )
    )
    outside = outside_own_classes(head_logits, own_labels, confidence=0.5, min_count=3)
    assert outside.tolist() == [False, True, True, False]
    assert outside_own_classes(head_logits, own_labels, 0.5, min_count=1).tolist() == [
        False, True, False, False,
    ]  # fmt: skip

    feats = torch.zeros(4, 2)  # every row exactly on the own training features: all familiar
    own_feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gate_weights = torch.tensor([[0.0, 0.5, 0.5]]).expand(4, -1)  # the gate: experts 1 and 2
    experts = {0: torch.nn.Linear(2, 4)}
    plain = plan_query(feats, gate_weights, experts, 0, local_first_mask(feats, own_feats, 0.7))
    assert bool((plain.weights[:, 0] == 1).all())  # local-first alone: every row stays home
    local = local_first_mask(feats, own_feats, 0.7, outside)
    checked = plan_query(feats, gate_weights, experts, 0, local)
    assert checked.weights[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.equal(checked.weights[1:3], gate_weights[1:3])


def test_the_class_check_needs_a_stage1_head() -> None:
    from nmoe.config import ConfigError

    with pytest.raises(ConfigError, match="gate.local_first_class_confidence"):
        compose_config(["experiment=smoke", "fe=fedsc", "gate.local_first_class_confidence=0.5"])
    with pytest.raises(ConfigError, match="gate.local_first_class_confidence"):
        compose_config(["experiment=smoke", "gate.local_first_class_confidence=1.0"])


def test_the_owners_local_first_floor_keeps_its_rows_whatever_the_class_check_says() -> None:
    """`local_first_mask`: rows familiar at the owner's floor quantile stay local even when the
    class check would send them to the gate; rows familiar only at the (wider) configured
    quantile do not; without a class check the floor changes nothing."""
    from nmoe.routing import familiar, local_first_mask, own_spread_of

    own_feats = torch.tensor([[0.0], [1.0], [3.0], [6.0]])  # leave-one-out NN distances 1, 1, 2, 3
    feats = torch.tensor([[0.5], [4.5], [9.5]])  # nearest distances 0.5, 1.5, 3.5
    assert familiar(feats, own_feats, 0.9).tolist() == [True, True, False]
    everything_outside = torch.ones(3, dtype=torch.bool)
    assert local_first_mask(feats, own_feats, 0.9, everything_outside).tolist() == [False] * 3
    kept = local_first_mask(feats, own_feats, 0.9, everything_outside, floor=0.1)  # radius 1
    assert kept.tolist() == [True, False, False]
    assert local_first_mask(feats, own_feats, 0.9, None, floor=0.1).tolist() == [True, True, False]
    spread = own_spread_of(own_feats)  # the device service computes it once: the same masks
    assert spread.tolist() == [1.0, 1.0, 2.0, 3.0]
    assert local_first_mask(feats, own_feats, 0.9, everything_outside, 0.1, spread).tolist() == [
        True, False, False,
    ]  # fmt: skip
