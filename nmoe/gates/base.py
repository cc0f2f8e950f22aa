"""What a gate is: one class per module in this package, found by the registry (`nmoe.gates`).

A gate says its name, whether it trains, its extra config keys, its client-side local training
and routing weights (torch), and its server-side stage, written against `GateServer`: the few
operations the ServerApp offers (federated rounds over the gate's shared keys, one client's
turn, installing a part on every client). The gate knows nothing of Flower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ..models import build_gate, load_numpy, state_numpy
from ..pipeline import PriorShift
from ..training import gate_weights, train_gate

Params = dict[str, np.ndarray]


@dataclass
class GateData:
    """A client's gate-training data: features of its gate split, labels, and every reachable
    expert's cached logits on them (n, E, C); `reachable` (E,) marks the experts it may use."""

    feats: torch.Tensor
    labels: torch.Tensor
    expert_logits: torch.Tensor
    reachable: torch.Tensor


class GateServer(Protocol):
    """The operations a gate's server-side stage may use (implemented by the ServerApp)."""

    @property
    def pids(self) -> list[int]: ...

    def federated_rounds(
        self, gate: Gate, initial: Params, rounds: int, shared_keys: Callable[[int], list[str]]
    ) -> Params:
        """`rounds` rounds in which every client trains the gate and the server averages the keys
        `shared_keys(round)` returns; round 1 sends `initial`, round r > 1 the keys averaged in
        round r - 1. Returns the server's copy of every key."""
        ...

    def train_on(
        self, gate: Gate, pid: int, params: Params, server_round: int
    ) -> tuple[Params, float] | None:
        """One client trains the gate from `params`: its shared keys and loss (None: it failed)."""
        ...

    def install(self, gate: Gate, params: Params) -> None:
        """Every client installs `params` (a subset of the gate's shared keys)."""
        ...

    def record(self, key: str, value: Any) -> None:
        """Keep a fact about the stage in results.json's `extra`."""
        ...

    def record_row(self, **row: Any) -> None:
        """Add a row to results.json's `history` (the stage's name is added)."""
        ...

    def log_round(self, rnd: int, total: int, **metrics: float) -> None:
        """Log one round's metrics with its time and the time left."""
        ...


class Gate:
    """Base of every gate. Subclasses set `name` and override what they change."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False  # trained in stage 3 (needs the cache of expert outputs)
    measurement_only: ClassVar[bool] = False  # never a configured gate nor a baseline
    # experts answer with their familiarity with each row (nearest own training feature's
    # distance over their familiarity radius), and `reweight` sets the final weights from it
    asks_familiarity: ClassVar[bool] = False
    Options: ClassVar[type | None] = None  # dataclass of the gate's own config keys (gate.<key>)

    # ---------------------------------------------------------------- config
    def validate(self, cfg: Any, used: bool, require: Callable[[bool, str, str], None]) -> None:
        """Check this gate's own config keys (`cfg` is the whole run config; `used`: the run
        routes with this gate); `require(ok, key, message)` raises."""

    # ---------------------------------------------------------------- client side (torch)
    def initial_params(self, model_cfg: Any, num_experts: int, seed: int) -> Params:
        """The gate's parameters before training (identical on every node for one seed)."""
        return {}

    def shared_keys(self, gate_cfg: Any, server_round: int, keys: list[str]) -> list[str]:
        """Of the gate's `keys`, those a client sends (the server averages) in `server_round`."""
        return []

    def installable_keys(self, gate_cfg: Any, keys: list[str]) -> list[str]:
        """Keys the server may ever set on a client (the shared part; the rest stays personal)."""
        return []

    def train(
        self, params: Params, data: GateData, model_cfg: Any, gate_cfg: Any, seed: int
    ) -> tuple[Params, float]:
        """One local training round from `params`; returns the new parameters and the loss."""
        raise NotImplementedError(f"gate '{self.name}' does not train")

    def weights(
        self,
        params: Params,
        feats: torch.Tensor,
        reachable: torch.Tensor,
        k: int,
        model_cfg: Any,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """(B, E) routing weights: zero for experts not chosen, rows summing to 1."""
        raise NotImplementedError

    def reweight(
        self,
        ratios: torch.Tensor,
        answered: torch.Tensor,
        own: int,
        shared: int | None,
        k: int,
        gate_cfg: Any,
    ) -> torch.Tensor:
        """(B, E) final weights from the experts' familiarity `ratios` (inf where unknown), for
        gates that `asks_familiarity`."""
        raise NotImplementedError

    def prior_shift(
        self, gate_cfg: Any, own_labels: torch.Tensor, num_classes: int, shared: int | None
    ) -> PriorShift | None:
        """The blend towards the device's own classes its requester applies in wave 3 (see
        `nmoe.pipeline.PriorShift`), from the labels of its own expert's training images; None:
        no blend."""
        return None

    # ---------------------------------------------------------------- server side
    def train_federated(
        self, server: GateServer, gate_cfg: Any, model_cfg: Any, num_experts: int, seed: int
    ) -> None:
        """Stage 3 for this gate (nothing for gates that do not train)."""


class MLPGate(Gate):
    """A trained gate network (`nmoe.models.Gate`: trunk + head) with noisy top-k routing."""

    trainable = True

    def initial_params(self, model_cfg: Any, num_experts: int, seed: int) -> Params:
        return state_numpy(build_gate(model_cfg, num_experts, seed))

    def module(self, params: Params, model_cfg: Any, num_experts: int) -> torch.nn.Module:
        gate = build_gate(model_cfg, num_experts, 0)
        load_numpy(gate, params)
        return gate

    def train(
        self, params: Params, data: GateData, model_cfg: Any, gate_cfg: Any, seed: int
    ) -> tuple[Params, float]:
        gate = self.module(params, model_cfg, data.expert_logits.shape[1])
        loss = train_gate(
            gate,
            data.feats,
            data.labels,
            data.expert_logits,
            data.reachable,
            k=int(gate_cfg.k),
            noise_std=float(gate_cfg.noise_std),
            epochs=int(gate_cfg.local_epochs),
            lr=float(gate_cfg.lr),
            batch_size=int(gate_cfg.batch_size),
            seed=seed,
        )
        return state_numpy(gate), loss

    def weights(
        self,
        params: Params,
        feats: torch.Tensor,
        reachable: torch.Tensor,
        k: int,
        model_cfg: Any,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return gate_weights(self.module(params, model_cfg, len(reachable)), feats, reachable, k)
