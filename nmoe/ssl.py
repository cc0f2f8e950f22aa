"""Stage 1 local update (FedCE, FedSC, hybrid) as the FedSC reference defines it (no Flower here).

One federated round of FedSC, after Jing et al., ICML 2024 (github.com/ShusenJing/FedSC_ICML2024):
1. every client loads the fresh global F + projector and computes its correlation matrix
   `client_correlation` (eval mode, no gradient, `passes` augmented passes over its data, clipped
   projector outputs, optional Gaussian noise) and sends it up;
2. the server sends each client the mean of the *other* clients' matrices (`others_average`);
3. each client runs `local_update` with C_ext and `alpha = shared_alpha(round, rounds)` at the
   learning rate `round_lr(base, round, rounds)` (cosine over the rounds, constant within one);
4. the server averages F + projector (plain FedAvg).
Without sharing, steps 1-2 are skipped and alpha is 1 (the local loss ||R||_F^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .losses import adjusted_cross_entropy, clip_to_mu, fedsc_loss, label_log_prior
from .models import STAGE1_PARTS, ExtractorBundle

METHODS = ("fedce", "fedsc", "hybrid")
ALPHA_MAX = 1.0
ALPHA_MIN = 0.2
Augment = Callable[..., torch.Tensor]  # (batch, generator=None) -> views


@dataclass(frozen=True)
class Stage1Settings:
    """Local stage-1 optimisation (defaults: the FedSC reference's client)."""

    method: str
    epochs: int = 1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 3.0  # max global gradient norm (0 = off)
    mu: float = 4.0  # squared clip radius of the projector outputs
    ssl_weight: float = 1.0  # lambda of the hybrid CE + lambda * SSL
    ce_on_view: bool = False  # hybrid/fedce: CE on the first augmented view instead of the image
    # tau of the logit-adjusted CE (`nmoe.losses.adjusted_cross_entropy`) with the client's label
    # prior over its labelled images; 0 = plain CE
    logit_adjust: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown stage-1 method '{self.method}' (one of {METHODS})")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if min(self.weight_decay, self.grad_clip, self.ssl_weight, self.logit_adjust) < 0:
            raise ValueError("weight_decay, grad_clip, ssl_weight, logit_adjust must be >= 0")
        if self.mu <= 0:
            raise ValueError("mu must be > 0")


@dataclass
class Stage1Result:
    """Mean loss parts over the local steps."""

    loss: float
    ce_loss: float
    ssl_loss: float
    steps: int


def shared_alpha(
    rnd: int, rounds: int, alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN
) -> float:
    """The reference's linear ramp for 0-based round `rnd` of `rounds`: 1 at round 0, falling by
    0.8 / rounds a round (the last round uses 0.2 + 0.8 / rounds; 0.2 itself is never reached)."""
    if rounds < 1 or not 0 <= rnd < rounds:
        raise ValueError(f"round {rnd} outside [0, {rounds})")
    return alpha_max - (alpha_max - alpha_min) * rnd / rounds


def round_lr(base_lr: float, rnd: int, rounds: int, cosine: bool = True) -> float:
    """Learning rate of 0-based round `rnd`: cosine annealing over the rounds to 0 (the reference
    steps a CosineAnnealingLR(T_max=rounds) once a round), or constant."""
    if rounds < 1 or not 0 <= rnd < rounds:
        raise ValueError(f"round {rnd} outside [0, {rounds})")
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * rnd / rounds)) if cosine else base_lr


def trained_parameters(bundle: ExtractorBundle, method: str) -> list[nn.Parameter]:
    """The parameters `method` trains (F + head, F + projector, or all three)."""
    return [p for part in STAGE1_PARTS[method] for p in getattr(bundle, part).parameters()]


@torch.no_grad()
def client_correlation(
    bundle: ExtractorBundle,
    x: torch.Tensor,
    augment: Augment,
    *,
    mu: float,
    passes: int = 5,
    batch_size: int = 512,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A client's correlation of the model it holds (the fresh global one): the mean of
    z z^T over `passes` x 2 augmented views of every image, z = clip(projector(F(view))), in eval
    mode, plus i.i.d. N(0, noise_std^2) on every entry (the reference adds 0.00104)."""
    if len(x) == 0 or passes < 1:
        raise ValueError("need at least one image and one pass")
    was_training = bundle.training
    bundle.eval()
    total: torch.Tensor | None = None
    for _ in range(passes):
        for xb in x.split(batch_size):
            views = torch.cat([augment(xb, generator), augment(xb, generator)])
            z = clip_to_mu(bundle.projector(bundle.fe(views)), mu).double()
            part = z.T @ z
            total = part if total is None else total + part
    assert total is not None
    corr = (total / (2 * passes * len(x))).float()
    if noise_std > 0:
        corr = corr + noise_std * torch.randn(corr.shape, generator=generator)
    bundle.train(was_training)
    return corr


def others_average(correlations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each client, the mean of the other clients' correlation matrices (the reference's
    (sum - own) / (N - 1))."""
    if len(correlations) < 2:
        raise ValueError("sharing correlations needs at least two clients")
    total = torch.stack(list(correlations)).sum(dim=0)
    return [(total - c) / (len(correlations) - 1) for c in correlations]


def local_update(
    bundle: ExtractorBundle,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor | None,
    *,
    settings: Stage1Settings,
    lr: float,
    seed: int,
    augment: Augment | None = None,
    c_ext: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> Stage1Result:
    """One client's stage-1 update, in place: `settings.epochs` passes of SGD (momentum, weight
    decay, gradient-norm clip; a fresh optimiser, as the reference makes one a round).

    fedce: CE over the labelled images only (an epoch is a pass over them). fedsc: the FedSC loss
    on two augmented views of every image (with `c_ext` and `alpha` when correlations are
    shared). hybrid: an epoch over every image, CE on the labelled ones in each batch +
    ssl_weight * FedSC. `labelled` is a bool mask over `x` (None = all labelled); the labels of
    unlabelled images are never read.
    """
    method = settings.method
    use_ce, use_ssl = method in ("fedce", "hybrid"), method in ("fedsc", "hybrid")
    if (use_ssl or settings.ce_on_view) and augment is None:
        raise ValueError(f"method '{method}' needs an augmentation")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    mask = torch.ones(len(x), dtype=torch.bool) if labelled is None else labelled.bool()
    if mask.shape != (len(x),):
        raise ValueError(f"labelled mask has shape {tuple(mask.shape)}, expected ({len(x)},)")
    if c_ext is not None and not torch.isfinite(c_ext).all():
        raise ValueError("c_ext holds non-finite values")
    generator = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(x)) if use_ssl else torch.nonzero(mask).flatten()
    log_prior = None
    if use_ce and settings.logit_adjust > 0 and bool(mask.any()):
        log_prior = label_log_prior(y[mask], bundle.head.out_features)
    params = trained_parameters(bundle, method)
    optimiser = torch.optim.SGD(
        params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    bundle.train()
    sums = {"loss": 0.0, "ce": 0.0, "ssl": 0.0}
    steps = 0
    for _ in range(settings.epochs):
        for batch in pool[torch.randperm(len(pool), generator=generator)].split(
            settings.batch_size
        ):
            if use_ssl and len(batch) < 2:
                continue
            xb = x[batch]
            loss = torch.zeros(())
            feats_view1 = None
            if use_ssl:
                assert augment is not None
                views = torch.cat([augment(xb, generator), augment(xb, generator)])
                feats = bundle.fe(views)
                feats_view1 = feats[: len(batch)]
                z = bundle.projector(feats)
                ssl, _ = fedsc_loss(
                    z[: len(batch)], z[len(batch) :], mu=settings.mu, c_ext=c_ext, alpha=alpha
                )
                loss = loss + (settings.ssl_weight if use_ce else 1.0) * ssl
                sums["ssl"] += float(ssl.detach())
            if use_ce:
                keep = mask[batch]
                if keep.any():
                    if settings.ce_on_view and feats_view1 is not None:
                        logits = bundle.head(feats_view1[keep])
                    elif settings.ce_on_view:
                        assert augment is not None
                        logits = bundle.classify(augment(xb[keep], generator))
                    else:
                        logits = bundle.classify(xb[keep])
                    ce = adjusted_cross_entropy(
                        logits, y[batch][keep], log_prior, settings.logit_adjust
                    )
                    loss = loss + ce
                    sums["ce"] += float(ce.detach())
            if not loss.requires_grad:
                continue
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite stage-1 loss at local step {steps}")
            optimiser.zero_grad()
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimiser.step()
            sums["loss"] += float(loss.detach())
            steps += 1
    n = max(steps, 1)
    return Stage1Result(sums["loss"] / n, sums["ce"] / n, sums["ssl"] / n, steps)


@torch.no_grad()
def ssl_validation_loss(
    bundle: ExtractorBundle, x: torch.Tensor, augment: Augment, *, mu: float, seed: int
) -> float:
    """The local FedSC loss on two augmented views of `x` (views seeded: comparable across
    rounds), in eval mode: FedSC's validation metric. Both views go through the projector in one
    batch, as in training (its BatchNorm normalises by the batch at hand)."""
    was_training = bundle.training
    bundle.eval()
    generator = torch.Generator().manual_seed(seed)
    views = torch.cat([augment(x, generator), augment(x, generator)])
    z = bundle.projector(bundle.fe(views))
    loss, _ = fedsc_loss(z[: len(x)], z[len(x) :], mu=mu)
    bundle.train(was_training)
    return float(loss)


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Plain (unweighted, as in the reference) FedAvg of state dicts."""
    return {k: torch.stack([s[k].float() for s in states]).mean(dim=0) for k in states[0]}
