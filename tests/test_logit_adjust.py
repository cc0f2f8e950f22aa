"""Logit-adjusted stage 1 (`fe.logit_adjust`): the loss, what it changes in a skewed client's
local update, the ClientApp's two schedules, and the `fedavg` baseline's plain run of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmoe.config import ConfigError, compose_config
from nmoe.losses import PRIOR_FLOOR, adjusted_cross_entropy, label_log_prior
from nmoe.models import CNNExtractor, ExtractorBundle, Projector
from nmoe.ssl import Stage1Settings, local_update
from nmoe.training import stage1_validation_loss
from nmoe_protocol import messages as wire

from .live import LiveNode, simulate


def test_the_prior_is_the_label_frequency_with_absent_classes_at_the_floor() -> None:
    prior = label_log_prior(torch.tensor([0, 0, 1, 3]), 5).exp()
    assert prior.tolist() == pytest.approx([0.5, 0.25, PRIOR_FLOOR, 0.25, PRIOR_FLOOR])
    with pytest.raises(ValueError, match="no labels"):
        label_log_prior(torch.tensor([], dtype=torch.long), 5)


def test_adjusted_cross_entropy_is_ce_of_the_logits_plus_tau_log_prior() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    log_prior = label_log_prior(y, 5)
    expected = F.cross_entropy(logits + 0.5 * log_prior, y)
    assert adjusted_cross_entropy(logits, y, log_prior, 0.5) == pytest.approx(float(expected))
    assert adjusted_cross_entropy(logits, y, None) == pytest.approx(
        float(F.cross_entropy(logits, y))
    )
    assert float(expected) != pytest.approx(float(F.cross_entropy(logits, y)))  # it can fail


def _digits(classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    from nmoe.data import load_digits_arrays

    data = load_digits_arrays()
    x, y = torch.as_tensor(data.images), torch.as_tensor(data.labels)
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep][:200], y[keep][:200]


def _absent_class_mass(tau: float) -> float:
    """A client holding two classes of digits trains F + head from the same start; returns the
    mean softmax mass its model then gives, on images of the *other* classes, to those classes."""
    x, y = _digits((0, 1))
    other_x, other_y = _digits((2, 3, 4, 5))
    torch.manual_seed(0)
    bundle = ExtractorBundle(CNNExtractor(1, 32, 64), nn.Linear(64, 10), Projector(64, 64, "batch"))
    settings = Stage1Settings(
        method="fedce", epochs=3, batch_size=32, weight_decay=0.0, grad_clip=0.0, logit_adjust=tau
    )
    local_update(bundle, x, y, None, settings=settings, lr=0.05, seed=1)
    bundle.eval()
    with torch.no_grad():
        probs = torch.softmax(bundle.classify(other_x), dim=1)
    return float(probs[:, 2:].sum(dim=1).mean())


def test_a_skewed_client_pulls_the_shared_head_to_its_own_classes_only_without_adjustment() -> None:
    """Plain CE on a two-class client drives the model to answer those two classes whatever the
    image (what FedAvg then averages); with the adjustment the absent classes keep their mass."""
    plain, adjusted = _absent_class_mass(0.0), _absent_class_mass(1.0)
    assert plain < 0.05
    assert adjusted > 0.5
    with pytest.raises(ValueError, match="logit_adjust"):
        Stage1Settings(method="fedce", logit_adjust=-1.0)


def test_validation_scores_the_adjusted_objective() -> None:
    x, y = _digits((0, 1, 2))
    torch.manual_seed(0)
    bundle = ExtractorBundle(CNNExtractor(1, 32, 64), nn.Linear(64, 10), Projector(64, 64, "batch"))
    log_prior = label_log_prior(y, 10)
    mask = torch.ones(len(y), dtype=torch.bool)
    score = stage1_validation_loss(
        bundle, "fedce", x, y, mask, None, mu=4.0, ssl_weight=1.0, seed=0, log_prior=log_prior,
        logit_adjust=1.0,
    )  # fmt: skip
    bundle.eval()
    with torch.no_grad():
        expected = F.cross_entropy(bundle.classify(x) + log_prior, y)
    assert score == pytest.approx(float(expected), rel=1e-5)


def test_a_negative_tau_is_refused() -> None:
    with pytest.raises(ConfigError, match="fe.logit_adjust"):
        compose_config(["experiment=smoke", "fe.logit_adjust=-0.5"])


def _val_score(node: LiveNode, schedule: str) -> float:
    reply = node.send(
        wire.ExtractorRequest(method="fedce", server_round=1, params=node.params, schedule=schedule)
    )
    assert not reply.has_error(), reply.error.reason
    return float(wire.ExtractorReply.from_message(reply).val_score)


@pytest.mark.usefixtures("task_identity")
def test_the_client_adjusts_stage_1_and_never_the_fedavg_baseline(tmp_path) -> None:
    """Same received model: the `fe` schedule scores (and trains) the adjusted CE, the `fedavg`
    baseline's schedule the plain CE, exactly as a client with the adjustment off."""
    base = ["fe.patience=2", "fe.local_epochs=1", "partition=pathological"]
    adjusted = LiveNode(tmp_path / "a", [*base, "fe.logit_adjust=1.0"])
    plain = LiveNode(tmp_path / "p", base)
    for node in (adjusted, plain):
        assert not node.send(wire.SetupRequest(config_json=node.cfg_json)).has_error()
    assert _val_score(adjusted, "fedavg") == pytest.approx(_val_score(plain, "fe"))
    assert _val_score(adjusted, "fe") != pytest.approx(_val_score(plain, "fe"))


def test_under_adjustment_the_fedavg_baseline_is_a_plain_run_of_its_own(tmp_path) -> None:
    results = simulate(
        tmp_path,
        [
            "experiment=smoke",
            "simulation.num_clients=2",
            "fe.rounds=2",
            "baseline.fedavg_rounds=2",
            "fe.logit_adjust=1.0",
            "expert.epochs=1",
            "gate=rangate",
            "baselines=[fedavg]",
        ],
    )
    assert results["status"] == "completed"
    stages = [h["stage"] for h in results["history"]]
    assert stages.count("fe_ce") == 2 and stages.count("baseline_fedavg") == 2
    assert results["comm_bytes"]["baseline_fedavg"]["up"] > 0
    fedavg = results["accuracy_global"]["fedavg"]["per_client"]
    assert len(fedavg) == 2 and all(np.isfinite(fedavg))
