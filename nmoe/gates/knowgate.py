"""KnowGate: routing by expertise, measured where the expertise lives.

Every reachable expert sees the sample's features and answers with its logits and its
familiarity: the distance from the sample to its nearest own expert-training feature over its
familiarity radius (the `know_quantile` of those features' leave-one-out nearest-neighbour
distances), computed by the expert's owner on data that never leaves it. The requester mixes
the `gate.k` experts most familiar with the sample (its own ratio divided by `know_own_bias`:
its queries mostly come from where its own data does), weights softmax(-ratio / temperature);
the shared expert (H_0, or stage 1's model with `expert.shared_model=stage1`) competes for every
row as if at ratio `know_shared_ratio` (0: it does not). A sample that no reachable personal
expert knows (every ratio, the own one unbiased, above `know_max_ratio`) goes to the shared
expert alone: there the answer is exactly the shared model's. Every other row's answer is
blended in wave 3 with the shared model's probabilities moved to the task's label prior
(`know_prior_weight`, `know_prior_mix`; `prior_shift`): a mixture of the balanced distribution and
the device's own, whose weight each task's rows estimate by maximum likelihood (a balanced task
keeps the balanced prior, a task from the device's own distribution gets the device's). Nothing is
trained and no statistics are published; each answer reveals one familiarity ratio per row.
Chosen on held-out seeds with bench/routing_lab.py (see bench/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..pipeline import PriorShift
from ..routing import own_label_prior
from .base import Gate, Params


@dataclass
class KnowGateOptions:
    # as conf/gate/knowgate.yaml (these apply where knowgate is a baseline of another gate)
    know_quantile: float = 0.7  # an expert's familiarity radius: this quantile of its NN distances
    know_own_bias: float = 3.0  # the requester's own ratio is divided by this
    know_temperature: float = 0.3  # softmax temperature over -ratio of the experts mixed
    know_max_ratio: float = 3.0  # beyond this ratio for every expert: the shared expert alone
    know_shared_ratio: float = 0.5  # > 0: the shared expert competes as if this familiar
    # the requester's blend towards the task's label prior: this weight of the shared model's
    # probabilities moved to mix * (own label frequencies) + (1 - mix) * balanced (0: off) ...
    know_prior_weight: float = 0.7
    # ... mix estimated from each task's rows (None), or fixed (the twelfth session's 2/3); and
    # those rows then take the share mix of the device's own model (its local head, else expert)
    know_prior_mix: Optional[float] = None
    know_own_share: bool = False


class KnowGate(Gate):
    name = "knowgate"
    asks_familiarity = True
    Options = KnowGateOptions

    def validate(self, cfg: Any, used: bool, require: Any) -> None:
        g = cfg.gate
        require(
            0 < g.know_quantile <= 1,
            "gate.know_quantile",
            f"must be in (0, 1], got {g.know_quantile}",
        )
        for key in ("know_own_bias", "know_temperature", "know_max_ratio"):
            require(g[key] > 0, f"gate.{key}", f"must be > 0, got {g[key]}")
        require(
            g.know_shared_ratio >= 0,
            "gate.know_shared_ratio",
            f"must be >= 0, got {g.know_shared_ratio}",
        )
        require(
            0 <= g.know_prior_weight <= 1,
            "gate.know_prior_weight",
            f"must be in [0, 1], got {g.know_prior_weight}",
        )
        require(
            g.know_prior_mix is None or 0 <= g.know_prior_mix <= 1,
            "gate.know_prior_mix",
            f"must be null (estimated per task) or in [0, 1], got {g.know_prior_mix}",
        )
        require(
            not g.know_own_share or g.know_prior_mix is None,
            "gate.know_own_share",
            "the own share is each task's estimated mix: needs gate.know_prior_mix=null (a fixed "
            f"mix of {g.know_prior_mix} would hand every task, balanced ones too, that share of "
            "the device's own model)",
        )
        require(
            not used or bool(cfg.expert.shared_expert),
            "expert.shared_expert",
            "knowgate falls back on the shared expert: use expert=with_shared",
        )

    def weights(
        self,
        params: Params,
        feats: torch.Tensor,
        reachable: torch.Tensor,
        k: int,
        model_cfg: Any,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Every reachable expert answers (the final weights come from their familiarity)."""
        return reachable.float().expand(len(feats), -1) / reachable.sum()

    def reweight(
        self,
        ratios: torch.Tensor,
        answered: torch.Tensor,
        own: int,
        shared: int | None,
        k: int,
        gate_cfg: Any,
    ) -> torch.Tensor:
        assert shared is not None
        r = ratios.clone()
        r[~answered] = float("inf")
        r[:, shared] = float("inf")  # the fallback, not a candidate ...
        nobody = r.min(dim=1).values > float(gate_cfg.know_max_ratio)  # before the own bias
        r[:, own] = r[:, own] / float(gate_cfg.know_own_bias)
        if float(gate_cfg.know_shared_ratio) > 0 and bool(answered[:, shared].all()):
            r[:, shared] = float(gate_cfg.know_shared_ratio)  # ... unless it competes
        top = min(k, r.shape[1])
        values, index = (-r).topk(top, dim=1)
        chosen = torch.softmax(values / float(gate_cfg.know_temperature), dim=1)
        chosen = torch.nan_to_num(chosen.masked_fill(values == float("-inf"), 0.0))
        weights = torch.zeros_like(r).scatter(1, index, chosen)
        weights[nobody] = 0.0
        weights[nobody, shared] = 1.0
        return weights

    def prior_shift(
        self, gate_cfg: Any, own_labels: torch.Tensor, num_classes: int, shared: int | None
    ) -> PriorShift | None:
        weight = float(gate_cfg.know_prior_weight)
        if (weight == 0 and not gate_cfg.know_own_share) or shared is None:
            return None
        mix = gate_cfg.know_prior_mix
        return PriorShift(
            shared,
            own_label_prior(own_labels, num_classes),
            weight,
            None if mix is None else float(mix),
            bool(gate_cfg.know_own_share),
        )
