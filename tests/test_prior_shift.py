"""KnowGate's blend towards the task's label prior (`gate.know_prior_weight`,
`gate.know_prior_mix`): what it estimates, what it computes, where wave 3 applies it, and where it
must not; each task's estimate reads its own rows only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nmoe.config import ConfigError, compose_config
from nmoe.gates import get
from nmoe.pipeline import PendingQuery, PriorShift, RoutePlan, apply_prior_shift, finish_query
from nmoe.routing import (
    blend_prior_shift,
    mixture_prior,
    own_label_prior,
    task_mixture_weight,
)

CLASSES = 3
MEANS = torch.tensor([-2.0, 0.0, 2.0])  # class-conditional N(mean, 1) in one dimension
OWN_LABELS = torch.tensor([0] * 30 + [1] * 9 + [2] * 1)  # a device that mostly saw class 0


def density(x: torch.Tensor) -> torch.Tensor:
    """(B, C) p(x | y), the same on every device (label shift only)."""
    return torch.exp(-0.5 * (x.view(-1, 1) - MEANS) ** 2)


def balanced_posterior(x: torch.Tensor) -> torch.Tensor:
    """(B, C) the exact posterior under balanced classes: what the shared model approximates."""
    return density(x) / density(x).sum(dim=1, keepdim=True)


def task(mix: float, rows: int, seed: int) -> torch.Tensor:
    """(rows,) inputs of a task drawn from `mixture_prior(own, mix)` under label shift."""
    g = torch.Generator().manual_seed(seed)
    prior = mixture_prior(own_label_prior(OWN_LABELS, CLASSES), mix)
    y = torch.multinomial(prior, rows, replacement=True, generator=g)
    return MEANS[y] + torch.randn(rows, generator=g)


def test_the_mixture_prior_gives_the_bayes_posterior() -> None:
    """The balanced posterior moved to a mixture prior (the blend at weight 1) is the posterior
    of that mixture, if only the label frequencies differ."""
    own = own_label_prior(OWN_LABELS, CLASSES)
    x = torch.linspace(-4, 4, 41)
    prior = mixture_prior(own, 0.5)
    shifted = blend_prior_shift(
        balanced_posterior(x), balanced_posterior(x), prior, 1.0, torch.zeros(41, dtype=torch.bool)
    )
    mixture = density(x) * (0.5 * own + 0.5 / CLASSES)
    assert torch.allclose(shifted, mixture / mixture.sum(dim=1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("mix", [0.0, 0.4, 1.0])
def test_a_task_recovers_the_weight_of_the_devices_own_distribution(mix: float) -> None:
    own = own_label_prior(OWN_LABELS, CLASSES)
    estimate = task_mixture_weight(balanced_posterior(task(mix, 4000, seed=1)), own)
    assert abs(estimate - mix) <= 0.08
    assert task_mixture_weight(torch.empty(0, CLASSES), own) == 0.0


def test_moving_a_task_to_its_estimated_prior_beats_both_fixed_priors() -> None:
    """On a task from the device's own distribution and on a balanced one, the estimated prior
    answers as well as the right fixed prior and better than the wrong one."""
    own = own_label_prior(OWN_LABELS, CLASSES)
    g = torch.Generator().manual_seed(2)
    for mix, wrong in ((1.0, 0.0), (0.0, 1.0)):
        prior = mixture_prior(own, mix)
        y = torch.multinomial(prior, 4000, replacement=True, generator=g)
        probs = balanced_posterior(MEANS[y] + torch.randn(4000, generator=g))

        def accuracy(m: float, probs: torch.Tensor = probs, y: torch.Tensor = y) -> float:
            moved = probs * mixture_prior(own, m)
            return float((moved.argmax(dim=1) == y).float().mean())

        estimated = accuracy(task_mixture_weight(probs, own))
        assert estimated >= accuracy(mix) - 0.005 and estimated > accuracy(wrong) + 0.02


HEAD_PROBS = torch.tensor([[0.1, 0.8, 0.1]] * 3)  # the device's local head: sure of class 1


def _finish(shift: PriorShift | None, mode: str = "infer", head: bool = False) -> torch.Tensor:
    """Three rows through wave 3: row 0 left to the shared slot (2) alone, row 1 mixed from
    the own expert (0) and the shared slot, row 2 kept on the own expert by local-first; with
    `head`, the device also holds a local head (HEAD_PROBS) that wave 1 ran on every row."""
    weights = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    shared_logits = torch.log(torch.tensor([[0.3, 0.1, 0.6]] * 3))  # class 2, not sure
    own_logits = torch.log(torch.tensor([[0.35, 0.1, 0.55]] * 3))
    local = {0: own_logits, 2: shared_logits}  # both held on the device, as in the ClientApp
    plan = RoutePlan(weights, local, {}, torch.log(HEAD_PROBS) if head else None)
    labels = torch.zeros(3, dtype=torch.long)
    pending = PendingQuery.from_arrays(
        PendingQuery(plan, labels, [3], mode, "knowgate").to_arrays()
    )
    (report,) = finish_query(pending, {}, CLASSES, 0, prior_shift=shift)
    return report.probabilities


def test_wave_three_blends_every_row_but_those_nobody_knows() -> None:
    own_labels = torch.tensor([0] * 40)  # a device that only ever saw class 0
    overrides = [
        "experiment=digits_default",
        "gate.know_prior_mix=1.0",
        "gate.know_own_share=false",
    ]
    cfg = compose_config(overrides).gate
    shift = get("knowgate").prior_shift(cfg, own_labels, CLASSES, shared=2)
    assert shift is not None and (shift.weight, shift.mix) == (0.7, 1.0)
    plain, blended = _finish(None), _finish(shift)
    assert torch.equal(blended[0], plain[0])  # nobody knows it: exactly the shared model
    for row in (1, 2):  # pulled towards the device's class 0, which now wins
        assert blended[row, 0] > plain[row, 0] and plain[row].argmax() == 2
        assert int(blended[row].argmax()) == 0
    assert torch.allclose(blended.sum(dim=1), torch.ones(3))
    assert torch.equal(_finish(shift, mode="oracle"), _finish(None, mode="oracle"))
    off = ["experiment=digits_default", "gate.know_prior_weight=0", "gate.know_own_share=false"]
    assert get("knowgate").prior_shift(compose_config(off).gate, own_labels, CLASSES, 2) is None


def test_each_task_estimates_its_prior_from_its_own_rows() -> None:
    """Two tasks in one query (a task from the device's own distribution, a balanced one): each
    is answered exactly as if it had come alone, and only the first is moved towards the
    device's classes."""
    own_task, balanced_task = task(1.0, 300, seed=3), task(0.0, 300, seed=4)
    shift = PriorShift(shared=1, own_prior=own_label_prior(OWN_LABELS, CLASSES), weight=1.0)

    def wave_three(x: torch.Tensor, segments: list[int]) -> torch.Tensor:
        shared = torch.log(balanced_posterior(x))
        logits = torch.stack([torch.zeros_like(shared), shared], dim=1)  # (B, own + shared, C)
        weights = torch.tensor([[0.5, 0.5]]).expand(len(x), -1)  # every row routed to both
        answered = torch.ones(len(x), 2, dtype=torch.bool)
        return apply_prior_shift(balanced_posterior(x), weights, logits, answered, shift, segments)

    together = wave_three(torch.cat([own_task, balanced_task]), [300, 300])
    assert torch.equal(together[:300], wave_three(own_task, [300]))
    assert torch.equal(together[300:], wave_three(balanced_task, [300]))
    moved_to_own = (together - balanced_posterior(torch.cat([own_task, balanced_task])))[:, 0]
    assert moved_to_own[:300].mean() > 0.1 > moved_to_own[300:].abs().mean()
    with pytest.raises(ValueError, match="segments"):
        wave_three(own_task, [200])


def test_the_fedavg_task_prior_baseline_moves_each_whole_split_to_its_own_prior() -> None:
    """`fedavg_task_prior` (the label-shift correction without experts) reads its prior from the
    whole split it answers, even one larger than an inference batch: it answers the device-like
    task better than the model alone and the balanced task no worse."""
    from client_app.app import at_task_prior
    from nmoe.training import INFERENCE_BATCH

    own = own_label_prior(OWN_LABELS, CLASSES)
    rows = 3 * INFERENCE_BATCH
    g = torch.Generator().manual_seed(4)

    def model(x: torch.Tensor) -> torch.Tensor:  # calibrated to balanced classes
        return torch.log(balanced_posterior(x.view(-1)))

    for mix in (1.0, 0.0):
        y = torch.multinomial(mixture_prior(own, mix), rows, replacement=True, generator=g)
        x = (MEANS[y] + torch.randn(rows, generator=g)).view(-1, 1)
        moved = at_task_prior(model, own, x)
        whole = balanced_posterior(x.view(-1)) * mixture_prior(
            own, task_mixture_weight(balanced_posterior(x.view(-1)), own)
        )
        assert torch.allclose(moved, whole / whole.sum(dim=1, keepdim=True), atol=1e-6)
        gain = (moved.argmax(dim=1) == y).float().mean() - (
            model(x).argmax(dim=1) == y
        ).float().mean()
        assert gain > 0.05 if mix == 1.0 else gain >= -0.005


@pytest.mark.parametrize(
    ("override", "key"),
    [("gate.know_prior_weight=1.5", "know_prior_weight"), ("gate.know_prior_mix=-1", "mix")],
)
def test_out_of_range_blend_options_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        compose_config(["experiment=digits_default", override])


@pytest.mark.parametrize("head", [True, False])
def test_the_own_share_hands_a_device_like_task_to_the_device(head: bool) -> None:
    """`gate.know_own_share` (on in digits_default): after the blend, every row but those the
    shared slot answers alone takes the share mix of the device's own model (its local head where
    it holds one, else its own expert). A task of the device's own classes (mix 1) is the device's
    answer alone, a balanced one (mix 0) the plain blend; a row nobody knows stays exactly the
    shared model's whatever the mix."""
    own_labels = torch.tensor([0] * 40)
    own = HEAD_PROBS[0] if head else torch.tensor([0.35, 0.1, 0.55])
    cfg = compose_config(["experiment=digits_default"]).gate
    estimated = get("knowgate").prior_shift(cfg, own_labels, CLASSES, shared=2)
    assert estimated is not None and estimated.own_share and estimated.mix is None
    for mix in (0.0, 0.5, 1.0):  # the share is the mix: fixed here to read it
        shift = replace(estimated, mix=mix)
        blended = _finish(replace(shift, own_share=False), head=head)
        shared = _finish(shift, head=head)
        assert torch.equal(shared[0], _finish(None, head=head)[0])
        for row in (1, 2):
            torch.testing.assert_close(shared[row], (1 - mix) * blended[row] + mix * own)
    assert torch.equal(_finish(shift, mode="oracle", head=head), _finish(None, mode="oracle"))
    with pytest.raises(ConfigError, match="'gate.know_own_share'"):  # every task would get 2/3
        compose_config(["experiment=digits_default", "gate.know_prior_mix=0.67"])
