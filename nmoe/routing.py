"""Top-k routing over a neighbour mask, local-first routing by feature distance, and the
weighted combination of expert logits."""

from __future__ import annotations

import torch

DISTANCE_CHUNK_ROWS = 4096  # rows of a distance matrix held at once (4096 x N floats)


def masked_scores(scores: torch.Tensor, reachable: torch.Tensor) -> torch.Tensor:
    """Scores with unreachable experts set to -inf. `reachable` is a bool (E,) mask."""
    return scores.masked_fill(~reachable.to(torch.bool), float("-inf"))


def topk_weights(
    scores: torch.Tensor,
    reachable: torch.Tensor,
    k: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    renormalise: bool = True,
) -> torch.Tensor:
    """Dense (B, E) weights: softmax over the top-k reachable (noisy) scores, zero elsewhere.

    With `renormalise=False` the kept weights are the softmax over *all* reachable scores
    (Switch-Transformer style), so a top-1 choice still passes a gradient to the gate.
    """
    num_reachable = int(reachable.sum())
    if k > num_reachable:
        raise ValueError(
            f"k={k} is larger than the neighbourhood ({num_reachable} reachable experts)"
        )
    if noise_std > 0:
        noise = torch.randn(scores.shape, generator=generator, dtype=scores.dtype) * noise_std
        scores = scores + noise
    scores = masked_scores(scores, reachable)
    top_values, top_index = scores.topk(k, dim=1)
    if renormalise:
        return torch.zeros_like(scores).scatter(1, top_index, torch.softmax(top_values, dim=1))
    return torch.zeros_like(scores).scatter(
        1, top_index, torch.softmax(scores, dim=1).gather(1, top_index)
    )


def random_weights(
    batch: int, reachable: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RanGate: k random reachable experts per sample, equal weights 1/k."""
    scores = torch.rand((batch, reachable.numel()), generator=generator)
    scores = masked_scores(scores, reachable)
    num_reachable = int(reachable.sum())
    if k > num_reachable:
        raise ValueError(
            f"k={k} is larger than the neighbourhood ({num_reachable} reachable experts)"
        )
    top_index = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores).scatter(1, top_index, 1.0 / k)


def combine(
    weights: torch.Tensor, expert_logits: torch.Tensor, answered: torch.Tensor, fallback: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = sum_j w_j * softmax(logits_j) over the chosen experts that answered, weights
    renormalised: a mixture of bounded per-expert probabilities (no expert can outvote the
    others by the size of its logits).

    weights (B, E), expert_logits (B, E, C), answered bool (B, E). A sample none of
    whose chosen experts answered falls back to expert `fallback` (the requester's
    own, always present). Returns (combined probabilities (B, C), degraded bool (B,)): the
    samples for which at least one chosen expert did not answer.
    """
    chosen = weights > 0
    degraded = (chosen & ~answered).any(dim=1)
    kept = weights * answered.to(weights.dtype)
    total = kept.sum(dim=1, keepdim=True)
    orphaned = total.squeeze(1) <= 0
    if bool(orphaned.any()):
        kept[orphaned, fallback] = 1.0
        total = kept.sum(dim=1, keepdim=True)
    kept = kept / total
    return (kept.unsqueeze(-1) * torch.softmax(expert_logits, dim=2)).sum(dim=1), degraded


def nearest_distances(
    queries: torch.Tensor,
    reference: torch.Tensor,
    exclude_self: bool = False,
    chunk: int = DISTANCE_CHUNK_ROWS,
) -> torch.Tensor:
    """(B,) Euclidean distance from each query row to its nearest reference row, `chunk` rows at a
    time (bounded memory); with `exclude_self`, queries are the reference and row i skips itself."""
    out = torch.empty(len(queries))
    for start in range(0, len(queries), chunk):
        block = torch.cdist(queries[start : start + chunk], reference)
        if exclude_self:
            rows = torch.arange(len(block))
            block[rows, rows + start] = float("inf")
        out[start : start + chunk] = block.min(dim=1).values
    return out


def own_spread_of(own_feats: torch.Tensor) -> torch.Tensor:
    """(n,) each own training feature's distance to its nearest other one (leave one out): what
    familiarity and local-first radii are quantiles of."""
    return nearest_distances(own_feats, own_feats, exclude_self=True)


def familiarity_radius(own_feats: torch.Tensor, quantile: float) -> float:
    """The `quantile` of own training features' nearest-neighbour distances to each other (leave
    one out): the radius within which a sample counts as familiar (inf for fewer than 2)."""
    if len(own_feats) < 2:
        return float("inf")
    return float(torch.quantile(own_spread_of(own_feats), quantile))


def familiarity(feats: torch.Tensor, own_feats: torch.Tensor, quantile: float) -> torch.Tensor:
    """(B,) nearest own training feature's distance over the familiarity radius: <= 1 familiar,
    larger the farther (inf with fewer than 2 own features)."""
    return familiarity_ratios(feats, own_feats, familiarity_radius(own_feats, quantile))


def familiarity_ratios(feats: torch.Tensor, own_feats: torch.Tensor, radius: float) -> torch.Tensor:
    """`familiarity` with the radius already computed (one radius serves many batches)."""
    if not 0 < radius < float("inf"):
        return torch.full((len(feats),), float("inf"))
    return nearest_distances(feats, own_feats) / radius


def familiar(feats: torch.Tensor, own_feats: torch.Tensor, quantile: float) -> torch.Tensor:
    """bool (B,): samples whose nearest own training feature is no farther than the `quantile` of
    own training features' nearest-neighbour distances to each other (leave one out)."""
    return local_first_mask(feats, own_feats, quantile)


def local_first_mask(
    feats: torch.Tensor,
    own_feats: torch.Tensor,
    quantile: float,
    not_local: torch.Tensor | None = None,
    floor: float = 0.0,
    own_spread: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool (B,): the rows local-first answers with the own expert alone: familiar at `quantile`
    (see `familiar`) and not in the bool (B,) mask `not_local`, except that rows familiar at the
    owner's `floor` quantile always stay (`floor` <= `quantile`). Distances computed once; pass
    `own_spread` (`own_spread_of(own_feats)`) where the own features stay fixed across calls."""
    if len(own_feats) < 2:
        return torch.zeros(len(feats), dtype=torch.bool)
    nearest = nearest_distances(feats, own_feats)
    spread = own_spread if own_spread is not None else own_spread_of(own_feats)
    local = nearest <= torch.quantile(spread, quantile)
    if not_local is not None:
        local &= ~not_local
        if floor > 0:
            local |= nearest <= torch.quantile(spread, floor)
    return local


def outside_own_classes(
    head_logits: torch.Tensor,
    own_labels: torch.Tensor,
    confidence: float,
    min_count: int,
) -> torch.Tensor:
    """bool (B,): rows that a shared classifier (stage 1's head) gives more than `confidence`
    probability for a class of which the own expert trained on fewer than `min_count` images
    (`own_labels`): local-first leaves them to the gate, whatever their familiarity."""
    probs = torch.softmax(head_logits, dim=1)
    counts = torch.bincount(own_labels, minlength=probs.shape[1])
    top, cls = probs.max(dim=1)
    return (top > confidence) & (counts[cls] < min_count)


def answer_locally(weights: torch.Tensor, own: int, local: torch.Tensor) -> torch.Tensor:
    """Local-first routing: the samples in the bool (B,) mask `local` go to the own expert alone
    (weight 1); the others keep their gate weights."""
    out = weights.clone()
    out[local] = 0.0
    out[local, own] = 1.0
    return out


PRIOR_SMOOTHING = 0.5  # added to every class count of the device's label prior
MIX_STEPS = 100  # a task's mixture weight is estimated to 1 / MIX_STEPS


def own_label_prior(own_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) the device's own label distribution: its class counts + PRIOR_SMOOTHING, normalised."""
    counts = torch.bincount(own_labels, minlength=num_classes).float() + PRIOR_SMOOTHING
    return counts / counts.sum()


def mixture_prior(own_prior: torch.Tensor, mix: float) -> torch.Tensor:
    """(C,) mix * `own_prior` + (1 - mix) * the balanced distribution."""
    return mix * own_prior + (1 - mix) / len(own_prior)


def task_mixture_weight(shared_probs: torch.Tensor, own_prior: torch.Tensor) -> float:
    """The weight in [0, 1] of the device's own label distribution in the prior that makes a task's
    rows most likely (`mixture_prior`), read from a classifier calibrated to balanced classes
    (`shared_probs`, (B, C)). Under label shift row i's likelihood under that prior is proportional
    to 1 + mix * (C * sum_y p(y | x_i) own(y) - 1), concave in mix: maximum likelihood on a grid
    (Saerens et al., 2002, along one direction). 0 for an empty task."""
    lift = shared_probs.shape[1] * (shared_probs * own_prior).sum(dim=1) - 1
    grid = torch.linspace(0, 1, MIX_STEPS + 1)
    loglik = torch.log1p(grid.unsqueeze(1) * lift.unsqueeze(0)).sum(dim=1)
    return float(grid[loglik.argmax()])


def blend_prior_shift(
    combined: torch.Tensor,
    shared_probs: torch.Tensor,
    prior: torch.Tensor,
    weight: float,
    keep: torch.Tensor,
) -> torch.Tensor:
    """(B, C) (1 - weight) * `combined` + weight * `shared_probs` moved to the (C,) `prior`
    (`move_to_prior`); the rows of the bool (B,) mask `keep` stay exactly `combined`."""
    shifted = move_to_prior(shared_probs, prior)
    return torch.where(keep.unsqueeze(1), combined, (1 - weight) * combined + weight * shifted)


def move_to_prior(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(B, C) `probs` re-weighted by the (C,) `prior` and renormalised: for probabilities
    calibrated to balanced classes, the posterior under that prior if only the label frequencies
    differ."""
    shifted = probs * prior
    return shifted / shifted.sum(dim=1, keepdim=True)


def move_to_task_prior(probs: torch.Tensor, own_prior: torch.Tensor) -> torch.Tensor:
    """(B, C) `probs` of one task's rows moved to the prior `task_mixture_weight` estimates from
    those rows: the correction KnowGate's wave 3 applies, on one model alone."""
    return move_to_prior(probs, mixture_prior(own_prior, task_mixture_weight(probs, own_prior)))
