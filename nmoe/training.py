"""Local training and evaluation loops on in-memory tensors (no Flower here)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .convergence import Patience
from .losses import adjusted_cross_entropy
from .models import ExtractorBundle
from .routing import topk_weights
from .ssl import Augment, Stage1Result, Stage1Settings, local_update, ssl_validation_loss

INFERENCE_BATCH = 512


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering range(n) once."""
    yield from torch.randperm(n, generator=generator).split(batch_size)


@torch.no_grad()
def forward_batched(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Evaluate `module` on `x` in chunks, without gradients."""
    if isinstance(module, nn.Module):
        module.eval()
    if len(x) == 0:
        raise ValueError("empty batch")
    return torch.cat([module(chunk) for chunk in x.split(INFERENCE_BATCH)])


def validation_loss(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Mean cross entropy of `model` on (x, y): the early-stopping metric of supervised training
    (smoother than accuracy on a few validation images, which saturates)."""
    return float(F.cross_entropy(forward_batched(model, x), y))


def stage1_validation_loss(
    bundle: ExtractorBundle,
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    augment: Augment | None,
    *,
    mu: float,
    ssl_weight: float,
    seed: int,
    log_prior: torch.Tensor | None = None,
    logit_adjust: float = 0.0,
) -> float | None:
    """Stage 1's validation loss: the objective the method trains, on held-out images. FedCE:
    cross entropy of F + head on the `labelled` ones (logit-adjusted by the client's
    `log_prior` when `logit_adjust` > 0, as in training); FedSC: its SSL loss on all of them;
    hybrid: CE + `ssl_weight` x SSL (validating hybrid on CE alone stopped it at its first rounds,
    while the SSL part reshaped the features and CE had not started to fall). None: nothing to
    score."""
    ce = ssl = None
    if method != "fedsc" and bool(labelled.any()):
        logits = forward_batched(bundle.classify, x[labelled])
        ce = float(adjusted_cross_entropy(logits, y[labelled], log_prior, logit_adjust))
    if method != "fedce" and len(x) > 1:
        assert augment is not None
        ssl = ssl_validation_loss(bundle, x, augment, mu=mu, seed=seed)
    if method == "fedce":
        return ce
    if method == "fedsc":
        return ssl
    return None if ce is None or ssl is None else ce + ssl_weight * ssl


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(dim=1) == y).float().mean()) if len(y) else 0.0


def train_extractor(
    bundle: ExtractorBundle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    labelled: torch.Tensor | None = None,
    ssl_weight: float = 1.0,
    mu: float = 4.0,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    augment: Augment | None = None,
    c_ext: torch.Tensor | None = None,
    alpha: float = 1.0,
    logit_adjust: float = 0.0,
) -> Stage1Result:
    """Stage 1 local update (`nmoe.ssl.local_update`): fedce (CE on the labelled images), fedsc
    (the FedSC loss on every image), hybrid (both); the CE logit-adjusted by the client's label
    prior when `logit_adjust` > 0. `labelled`: bool mask over `x` (None: all)."""
    settings = Stage1Settings(
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        mu=mu,
        ssl_weight=ssl_weight,
        logit_adjust=logit_adjust,
    )
    return local_update(
        bundle,
        x,
        y,
        labelled,
        settings=settings,
        lr=lr,
        seed=seed,
        augment=augment,
        c_ext=c_ext,
        alpha=alpha,
    )


def train_supervised_until_converged(
    bundle: ExtractorBundle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_epochs: int,
    patience: int,
    val_fraction: float,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """F + head trained with cross entropy one epoch at a time, stopping after `patience` epochs
    without improvement of the cross entropy on a held-out `val_fraction` of (x, y) (patience 0:
    every epoch), keeping the best epoch's weights. Returns epochs run, best epoch, best score
    (the negated validation loss)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    held = max(1, int(len(y) * val_fraction)) if patience > 0 and len(y) > 1 else 0
    val, train = order[:held], order[held:]
    rule = Patience(patience)
    best = {k: v.clone() for k, v in bundle.state_dict().items()}
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        train_extractor(
            bundle,
            x[train],
            y[train],
            method="fedce",
            epochs=1,
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            seed=seed + epoch,
        )
        if not held:
            continue
        score = -validation_loss(bundle.classify, x[val], y[val])
        if rule.update(epoch, score):
            best = {k: v.clone() for k, v in bundle.state_dict().items()}
        if rule.stop:
            break
    if held:
        bundle.load_state_dict(best)
    return {"epochs_run": epoch, "best_epoch": rule.best_step or epoch, "best_val": rule.best}


def fit(
    module: nn.Module,
    num_samples: int,
    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Adam over shuffled minibatches of `num_samples`; `batch_loss(indices, generator)` gives
    each batch's loss. Returns the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        epoch_loss, n = 0.0, 0
        for idx in minibatches(num_samples, batch_size, generator):
            loss = batch_loss(idx, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            epoch_loss += float(loss.detach()) * len(idx)
            n += len(idx)
        epoch_loss /= max(n, 1)
    return epoch_loss


def train_classifier(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    proximal: float = 0.0,
) -> float:
    """Supervised training of a small module (expert, head, probe); returns last-epoch loss.
    `proximal` > 0 adds proximal/2 x ||w - w_start||^2, which keeps the module near the weights
    it started from (Ditto's personal objective, Li et al., ICML 2021: a personal expert
    fine-tuned from the shared one keeps what that one knows of classes its owner lacks)."""
    start = [p.detach().clone() for p in module.parameters()] if proximal > 0 else []

    def batch_loss(idx: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        loss = F.cross_entropy(module(x[idx]), y[idx])
        if start:
            params = module.parameters()
            drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
            loss = loss + proximal / 2 * drift
        return loss

    return fit(
        module,
        len(x),
        batch_loss,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )


def train_gate(
    gate: nn.Module,
    feats: torch.Tensor,
    y: torch.Tensor,
    expert_logits: torch.Tensor,
    reachable: torch.Tensor,
    *,
    k: int,
    noise_std: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train the gate on cached expert outputs (n, E, C): negative log-likelihood of the
    noisy top-k mixture of the experts' probabilities.

    For k = 1 the softmax over one score is constant, so the kept weight is the softmax over
    all reachable experts instead (Switch style); inference uses the plain top-k rule.
    """

    def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        weights = topk_weights(
            gate(feats[idx]), reachable, k, noise_std, generator, renormalise=k > 1
        )
        probs = (weights.unsqueeze(-1) * torch.softmax(expert_logits[idx], dim=2)).sum(dim=1)
        return F.nll_loss(torch.log(probs.clamp_min(1e-12)), y[idx])

    return fit(gate, len(feats), batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


@torch.no_grad()
def gate_weights(
    gate: nn.Module, feats: torch.Tensor, reachable: torch.Tensor, k: int
) -> torch.Tensor:
    """Inference routing weights: plain top-k over reachable experts (no noise)."""
    gate.eval()
    return topk_weights(forward_batched(gate, feats), reachable, k)
