"""KnowGate's blend towards the requester's own classes (`gate.know_prior_weight`,
`gate.know_prior_boost`): what it computes, where wave 3 applies it, and where it must not."""

from __future__ import annotations

import pytest
import torch

from nmoe.config import ConfigError, compose_config
from nmoe.gates import get
from nmoe.pipeline import PendingQuery, PriorShift, RoutePlan, finish_query
from nmoe.routing import PRIOR_SMOOTHING, own_prior_factor

CLASSES = 3
MEANS = torch.tensor([-2.0, 0.0, 2.0])  # class-conditional N(mean, 1) in one dimension


def density(x: torch.Tensor) -> torch.Tensor:
    """(B, C) p(x | y), the same on every device (label shift only)."""
    return torch.exp(-0.5 * (x.view(-1, 1) - MEANS) ** 2)


def test_boost_one_gives_the_bayes_posterior_of_the_even_mixture() -> None:
    """Under label shift, the balanced posterior times the factor of boost 1 is the posterior of
    an even mixture of the balanced distribution and the device's own."""
    own_labels = torch.tensor([0] * 30 + [1] * 9 + [2] * 1)
    counts = torch.bincount(own_labels, minlength=CLASSES).float() + PRIOR_SMOOTHING
    own_prior = counts / counts.sum()
    x = torch.linspace(-4, 4, 41)
    balanced = density(x) / density(x).sum(dim=1, keepdim=True)
    shifted = balanced * own_prior_factor(own_labels, CLASSES, 1.0)
    shifted = shifted / shifted.sum(dim=1, keepdim=True)
    mixture = density(x) * (0.5 * own_prior + 0.5 / CLASSES)
    assert torch.allclose(shifted, mixture / mixture.sum(dim=1, keepdim=True), atol=1e-6)


def _finish(shift: PriorShift | None, mode: str = "infer") -> torch.Tensor:
    """Three rows through wave 3: row 0 left to the shared slot (2) alone, row 1 mixed from
    the own expert (0) and the shared slot, row 2 kept on the own expert by local-first."""
    weights = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    shared_logits = torch.log(torch.tensor([[0.3, 0.1, 0.6]] * 3))  # class 2, not sure
    own_logits = torch.log(torch.tensor([[0.35, 0.1, 0.55]] * 3))
    local = {0: own_logits, 2: shared_logits}  # both held on the device, as in the ClientApp
    plan = RoutePlan(weights, local, {})
    labels = torch.zeros(3, dtype=torch.long)
    (report,) = finish_query(
        PendingQuery(plan, labels, [3], mode, "knowgate"), {}, CLASSES, 0, prior_shift=shift
    )
    return report.probabilities


def test_wave_three_blends_every_row_but_those_nobody_knows() -> None:
    own_labels = torch.tensor([0] * 40)  # a device that only ever saw class 0
    cfg = compose_config(["experiment=digits_default"]).gate
    shift = get("knowgate").prior_shift(cfg, own_labels, CLASSES, shared=2)
    assert shift is not None and (shift.weight, cfg.know_prior_boost) == (0.5, 2.0)
    plain, blended = _finish(None), _finish(shift)
    assert torch.equal(blended[0], plain[0])  # nobody knows it: exactly the shared model
    for row in (1, 2):  # pulled towards the device's class 0, which now wins
        assert blended[row, 0] > plain[row, 0] and plain[row].argmax() == 2
        assert int(blended[row].argmax()) == 0
    assert torch.allclose(blended.sum(dim=1), torch.ones(3))
    assert torch.equal(_finish(shift, mode="oracle"), _finish(None, mode="oracle"))
    off = compose_config(["experiment=digits_default", "gate.know_prior_weight=0"]).gate
    assert get("knowgate").prior_shift(off, own_labels, CLASSES, shared=2) is None


@pytest.mark.parametrize(
    ("override", "key"),
    [("gate.know_prior_weight=1.5", "know_prior_weight"), ("gate.know_prior_boost=-1", "boost")],
)
def test_out_of_range_blend_options_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        compose_config(["experiment=digits_default", override])
