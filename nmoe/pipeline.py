"""Collaborative inference on one requester, as plain torch: plan a routed query, answer peers'
feature batches, assemble what came back, combine, and report per split.

The ClientApp's `query.*` handlers and the inference benchmark both call these functions; the
handlers only move their inputs and outputs across the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .routing import (
    answer_locally,
    blend_prior_shift,
    combine,
    mixture_prior,
    task_mixture_weight,
)
from .training import accuracy, forward_batched

ORACLE = "oracle"  # the query mode of the oracle router
# (ratios (B, E), answered (B, E)) -> weights (B, E): a familiarity-asking gate's final weights
Reweight = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RoutePlan:
    """What a requester keeps between wave 1 and wave 3."""

    weights: torch.Tensor  # (B, E) routing weights, zero for experts not chosen
    local_logits: dict[int, torch.Tensor]  # expert id -> (B, C), for experts held locally
    remote_index: dict[int, torch.Tensor]  # expert id -> indices of the samples sent to it
    # (B, C) the device's own model (its local head) on every sample, where it holds one
    own_logits: torch.Tensor | None = None


@dataclass
class PriorShift:
    """KnowGate's blend towards the device's own classes (`gate.know_prior_weight`): the shared
    slot's probabilities moved to the prior `mix` * `own_prior` + (1 - `mix`) * balanced
    (`nmoe.routing.mixture_prior`), mixed in with `weight` on every row but those the shared slot
    answers alone. `mix` None: estimated per task (`nmoe.routing.task_mixture_weight`). With
    `own_share` those rows then also take the share `mix` of the device's own model (its local
    head, else its expert): a task that looks like the device's own data is answered mostly by
    it, a balanced one by the mixture."""

    shared: int  # the shared slot's expert id
    own_prior: torch.Tensor  # (C,) the device's own label distribution
    weight: float
    mix: float | None = None
    own_share: bool = False


def apply_prior_shift(
    combined: torch.Tensor,
    weights: torch.Tensor,
    logits: torch.Tensor,
    answered: torch.Tensor,
    shift: PriorShift,
    segments: list[int],
    own_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C) the mixture `combined` of `weights` (B, E) over `logits` (B, E, C) with `shift`
    blended in, except on the rows the shared slot answers alone (nobody knows them: they stay
    exactly the shared model's) or did not answer. Each segment of rows (`segments`: sizes, in
    order) is one task: where `shift.mix` is None its prior is estimated from its own rows only.
    With `shift.own_share` the same rows then take the share mix of `own_probs` (B, C), the
    device's own model."""
    if shift.own_share and own_probs is None:
        raise ValueError("the prior shift asks for the own model's share: own_probs is needed")
    chosen = weights > 0
    alone = chosen[:, shift.shared] & (chosen.sum(dim=1) == 1)
    shared_probs = torch.softmax(logits[:, shift.shared], dim=1)
    heard = answered[:, shift.shared]
    keep = alone | ~heard
    if sum(segments) != len(combined):
        raise ValueError(f"segments {segments} do not cover the {len(combined)} rows")
    parts, start = [], 0
    for size in segments:
        task = slice(start, start + size)
        start += size
        mix = shift.mix
        if mix is None:
            mix = task_mixture_weight(shared_probs[task][heard[task]], shift.own_prior)
        prior = mixture_prior(shift.own_prior, mix)
        part = blend_prior_shift(
            combined[task], shared_probs[task], prior, shift.weight, keep[task]
        )
        if shift.own_share:
            with_own = (1 - mix) * part + mix * own_probs[task]
            part = torch.where(keep[task].unsqueeze(1), part, with_own)
        parts.append(part)
    return torch.cat(parts) if parts else combined[:0]


@dataclass
class PendingQuery:
    """A routed query between its waves: the plan, the labels, the split sizes, the gate, and
    (for gates that ask familiarity) the requester's own familiarity with each sample."""

    plan: RoutePlan
    labels: torch.Tensor
    segments: list[int]
    mode: str
    gate: str = ""
    own_ratio: torch.Tensor | None = None
    created: float = 0.0  # wall-clock time of wave 1 (a node expires queries never combined)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "created": np.array([self.created], np.float64),
            "weights": self.plan.weights.numpy(),
            "labels": self.labels.numpy(),
            "segments": np.asarray(self.segments, np.int64),
            "mode": _text(self.mode),
            "gate": _text(self.gate),
        }
        if self.own_ratio is not None:
            arrays["own_ratio"] = self.own_ratio.numpy()
        if self.plan.own_logits is not None:
            arrays["own_logits"] = self.plan.own_logits.numpy()
        arrays.update({f"local.{e}": v.numpy() for e, v in self.plan.local_logits.items()})
        arrays.update({f"index.{e}": v.numpy() for e, v in self.plan.remote_index.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PendingQuery:
        def by_id(prefix: str) -> dict[int, torch.Tensor]:
            return {
                int(k.split(".", 1)[1]): torch.from_numpy(v)
                for k, v in arrays.items()
                if k.startswith(prefix)
            }

        own_logits = torch.from_numpy(arrays["own_logits"]) if "own_logits" in arrays else None
        plan = RoutePlan(
            torch.from_numpy(arrays["weights"]), by_id("local."), by_id("index."), own_logits
        )
        own_ratio = torch.from_numpy(arrays["own_ratio"]) if "own_ratio" in arrays else None
        return cls(
            plan,
            torch.from_numpy(arrays["labels"]),
            [int(v) for v in arrays["segments"]],
            bytes(arrays["mode"]).decode(),
            bytes(arrays["gate"]).decode(),
            own_ratio,
            float(arrays["created"][0]),
        )


def _text(value: str) -> np.ndarray:
    return np.frombuffer(value.encode(), np.uint8).copy()


def local_logits(
    feats: torch.Tensor, local_experts: dict[int, nn.Module]
) -> dict[int, torch.Tensor]:
    """Every locally held expert's logits on every sample."""
    return {e: forward_batched(module, feats) for e, module in local_experts.items()}


def plan_route(weights: torch.Tensor, local: dict[int, torch.Tensor]) -> RoutePlan:
    """Keep the local experts' logits; list the samples each remote expert must see."""
    chosen = weights > 0
    remote_index = {
        e: torch.nonzero(chosen[:, e]).flatten()
        for e in range(weights.shape[1])
        if e not in local and bool(chosen[:, e].any())
    }
    return RoutePlan(weights, local, remote_index)


def plan_query(
    feats: torch.Tensor,
    weights: torch.Tensor,
    local_experts: dict[int, nn.Module],
    own: int,
    local: torch.Tensor | None = None,
    own_model: nn.Module | None = None,
) -> RoutePlan:
    """Wave 1 on the requester: the gate's `weights`, local-first routing (the rows of the bool
    (B,) mask `local`, see `nmoe.routing.local_first_mask`, go to the own slot alone, answered by
    `own_model` where given, e.g. a local head, else by the own expert), the local experts'
    logits, `own_model`'s logits on every sample (for `PriorShift.own_share`), and the samples
    each remote expert must see."""
    logits = local_logits(feats, local_experts)
    own_logits = forward_batched(own_model, feats) if own_model is not None else None
    if local is not None:
        weights = answer_locally(weights, own, local)
        if own_logits is not None:
            logits[own][local] = own_logits[local]
    return replace(plan_route(weights, logits), own_logits=own_logits)


def outgoing_features(
    plan: RoutePlan, feats: torch.Tensor, noise_std: float, generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """The feature rows each remote expert gets, with Gaussian noise of `noise_std` added."""
    out = {}
    for e, index in plan.remote_index.items():
        sent = feats[index]
        if noise_std > 0:
            sent = sent + torch.randn(sent.shape, generator=generator) * noise_std
        out[e] = sent
    return out


def answer(expert: nn.Module, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Wave 2 on an expert owner: its expert's logits on every batch addressed to it."""
    return {key: forward_batched(expert, feats) for key, feats in batches.items()}


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
                f"expert {e} returned shape {tuple(values.shape)}, "
                f"expected {(len(index), num_classes)}"
            )
        logits[index, e] = values
        answered[index, e] = True
    return logits, answered


def route_counts(weights: torch.Tensor) -> list[int]:
    """How many samples were routed to each expert id."""
    return [int(v) for v in (weights > 0).sum(dim=0)]


@dataclass
class SplitReport:
    """What one split of a routed query came to on the requester."""

    num_examples: int
    accuracy: float
    degraded: int  # samples that lost a chosen expert
    answered_locally: int  # samples whose every chosen expert is held on the device
    route_counts: list[int]
    predictions: list[int]
    probabilities: torch.Tensor  # (n, C) the combined class probabilities


def oracle_weights(
    logits: torch.Tensor, answered: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The oracle router (a measurement, never a deployable gate: it reads the true labels): per
    sample, all weight on one answered expert that predicts the true label (the one most sure of
    it), or, if none does, on the one giving it the highest probability. A sample is answered
    right iff some reachable expert gets it right: the ceiling of routing to one expert."""
    probs = torch.softmax(logits, dim=2)
    true_prob = probs.gather(2, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(2)
    right = probs.argmax(dim=2) == labels.view(-1, 1)
    score = (true_prob + 2.0 * right.float()).masked_fill(~answered, -1.0)
    return torch.zeros(answered.shape).scatter(1, score.argmax(dim=1).view(-1, 1), 1.0)


def familiar_weights(
    pending: PendingQuery,
    answered: torch.Tensor,
    remote_ratios: dict[int, torch.Tensor],
    own: int,
    reweight: Reweight,
) -> torch.Tensor:
    """The final weights of a gate that asks familiarity: (B, E) ratios (own from the requester,
    the others from what each expert returned for the rows it got, inf where unknown) through the
    gate's `reweight`; samples answered locally (local-first) keep their own expert alone."""
    plan = pending.plan
    ratios = torch.full(plan.weights.shape, float("inf"))
    if pending.own_ratio is not None:
        ratios[:, own] = pending.own_ratio
    for e, values in remote_ratios.items():
        index = plan.remote_index.get(e)
        if index is not None and values.shape == (len(index),):
            ratios[index, e] = values
    weights = reweight(ratios, answered)
    local = (plan.weights > 0).sum(dim=1) == 1
    weights[local] = plan.weights[local]
    return weights


def finish_query(
    pending: PendingQuery,
    remote_logits: dict[int, torch.Tensor],
    num_classes: int,
    own: int,
    remote_ratios: dict[int, torch.Tensor] | None = None,
    reweight: Reweight | None = None,
    prior_shift: PriorShift | None = None,
) -> list[SplitReport]:
    """Wave 3 on the requester: combine local and returned logits (renormalised over the experts
    that answered; the own expert is always there), blend in `prior_shift` where given, and
    report per split, in order."""
    plan = pending.plan
    logits, answered = assemble(plan, remote_logits, num_classes)
    if reweight is not None:
        plan = replace(
            plan, weights=familiar_weights(pending, answered, remote_ratios or {}, own, reweight)
        )
    if pending.mode == ORACLE:
        plan = replace(plan, weights=oracle_weights(logits, answered, pending.labels))
    combined, degraded = combine(plan.weights, logits, answered, fallback=own)
    if prior_shift is not None and pending.mode != ORACLE:
        own_logits = plan.own_logits if plan.own_logits is not None else logits[:, own]
        combined = apply_prior_shift(
            combined,
            plan.weights,
            logits,
            answered,
            prior_shift,
            pending.segments,
            torch.softmax(own_logits, dim=1),
        )
    predictions = combined.argmax(dim=1)
    held_elsewhere = torch.ones(plan.weights.shape[1], dtype=torch.bool)
    held_elsewhere[list(plan.local_logits)] = False
    on_device = ~(plan.weights[:, held_elsewhere] > 0).any(dim=1)
    reports, start = [], 0
    for size in pending.segments:
        part = slice(start, start + size)
        start += size
        reports.append(
            SplitReport(
                num_examples=size,
                accuracy=accuracy(combined[part], pending.labels[part]),
                degraded=int(degraded[part].sum()),
                answered_locally=int(on_device[part].sum()),
                route_counts=route_counts(plan.weights[part]),
                predictions=[int(p) for p in predictions[part]],
                probabilities=combined[part],
            )
        )
    return reports
