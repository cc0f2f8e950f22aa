"""Top-k routing over a neighbour mask and the weighted combination of expert logits."""

from __future__ import annotations

import torch


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
        raise ValueError(f"k={k} is larger than the neighbourhood ({num_reachable} reachable experts)")
    if noise_std > 0:
        noise = torch.randn(scores.shape, generator=generator, dtype=scores.dtype) * noise_std
        scores = scores + noise
    scores = masked_scores(scores, reachable)
    top_values, top_index = scores.topk(k, dim=1)
    if renormalise:
        return torch.zeros_like(scores).scatter(1, top_index, torch.softmax(top_values, dim=1))
    return torch.zeros_like(scores).scatter(1, top_index, torch.softmax(scores, dim=1).gather(1, top_index))


def random_weights(
    batch: int, reachable: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RanGate: k random reachable experts per sample, equal weights 1/k."""
    scores = torch.rand((batch, reachable.numel()), generator=generator)
    scores = masked_scores(scores, reachable)
    num_reachable = int(reachable.sum())
    if k > num_reachable:
        raise ValueError(f"k={k} is larger than the neighbourhood ({num_reachable} reachable experts)")
    top_index = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores).scatter(1, top_index, 1.0 / k)


def combine(
    weights: torch.Tensor, expert_logits: torch.Tensor, answered: torch.Tensor, fallback: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sum_j w_j * logits_j over the chosen experts that answered, weights renormalised.

    weights (B, E), expert_logits (B, E, C), answered bool (B, E). A sample none of
    whose chosen experts answered falls back to expert `fallback` (the requester's
    own, always present). Returns (combined logits (B, C), degraded bool (B,)): the
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
    return (kept.unsqueeze(-1) * expert_logits).sum(dim=1), degraded


def label_share(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) share of each class among a client's own training labels."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    return counts / counts.sum().clamp(min=1.0)


def answer_locally(
    weights: torch.Tensor, own: int, classifier_logits: torch.Tensor, share: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-first routing: a sample whose class, as a global classifier predicts it, makes up at
    least `threshold` of the requester's own training labels goes to the own expert alone (weight 1);
    the others keep their gate weights. Returns (weights, bool (B,) mask of the samples kept local)."""
    local = share[classifier_logits.argmax(dim=1)] >= threshold
    out = weights.clone()
    out[local] = 0.0
    out[local, own] = 1.0
    return out, local
