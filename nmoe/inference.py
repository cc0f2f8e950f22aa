"""Collaborative inference on one requester: split a batch by chosen expert, reassemble logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .training import forward_batched


@dataclass
class RoutePlan:
    """What a requester keeps between wave 1 and wave 3."""

    weights: torch.Tensor  # (B, E) routing weights, zero for experts not chosen
    local_logits: dict[int, torch.Tensor]  # expert id -> (B, C), for experts held locally
    remote_index: dict[int, torch.Tensor]  # expert id -> indices of the samples sent to it


def local_logits(
    feats: torch.Tensor, local_experts: dict[int, nn.Module]
) -> dict[int, torch.Tensor]:
    """Every locally held expert's logits on every sample."""
    return {e: forward_batched(module, feats) for e, module in local_experts.items()}


def plan_route(weights: torch.Tensor, local_logits: dict[int, torch.Tensor]) -> RoutePlan:
    """Keep the local experts' logits; list the samples each remote expert must see."""
    chosen = weights > 0
    remote_index = {
        e: torch.nonzero(chosen[:, e]).flatten()
        for e in range(weights.shape[1])
        if e not in local_logits and bool(chosen[:, e].any())
    }
    return RoutePlan(weights, local_logits, remote_index)


def assemble(
    plan: RoutePlan, remote_logits: dict[int, torch.Tensor], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E, C) expert logits and (B, E) answered mask from local and returned logits."""
    batch, num_experts = plan.weights.shape
    logits = torch.zeros(batch, num_experts, num_classes)
    answered = torch.zeros(batch, num_experts, dtype=torch.bool)
    for e, values in plan.local_logits.items():
        logits[:, e] = values
        answered[:, e] = True
    for e, values in remote_logits.items():
        index = plan.remote_index.get(e)
        if index is None:
            raise ValueError(f"logits from expert {e}, which was not asked")
        if tuple(values.shape) != (len(index), num_classes):
            raise ValueError(
                f"expert {e} returned shape {tuple(values.shape)}, expected {(len(index), num_classes)}"
            )
        logits[index, e] = values
        answered[index, e] = True
    return logits, answered


def route_counts(weights: torch.Tensor) -> list[int]:
    """How many samples were routed to each expert id."""
    return [int(v) for v in (weights > 0).sum(dim=0)]
