"""RanGate (baseline): k random reachable experts per sample, equal weights, no training."""

from __future__ import annotations

from typing import Any

import torch

from ..routing import random_weights
from .base import Gate, Params


class RanGate(Gate):
    name = "rangate"

    def weights(
        self,
        params: Params,
        feats: torch.Tensor,
        reachable: torch.Tensor,
        k: int,
        model_cfg: Any,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return random_weights(len(feats), reachable, k, generator)
