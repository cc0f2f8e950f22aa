"""RollGate: one gate passed from client to client, each training it on its own data in turn
(`gate.rounds` passes, the order fixed or reshuffled each pass); no averaging."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import GateServer, MLPGate, Params


@dataclass
class RollGateOptions:
    roll_order: str = "fixed"  # fixed | shuffled (a new order every pass)


ROLL_ORDERS = ("fixed", "shuffled")


class RollGate(MLPGate):
    name = "rollgate"
    Options = RollGateOptions

    def validate(self, cfg: Any, used: bool, require: Any) -> None:
        gate_cfg = cfg.gate
        order = gate_cfg.roll_order
        require(
            order in ROLL_ORDERS,
            "gate.roll_order",
            f"got '{order}', allowed values: {', '.join(ROLL_ORDERS)}",
        )

    def shared_keys(self, gate_cfg: Any, server_round: int, keys: list[str]) -> list[str]:
        return list(keys)  # the whole gate travels

    def installable_keys(self, gate_cfg: Any, keys: list[str]) -> list[str]:
        return list(keys)

    def train_federated(
        self, server: GateServer, gate_cfg: Any, model_cfg: Any, num_experts: int, seed: int
    ) -> None:
        params: Params = self.initial_params(model_cfg, num_experts, seed)
        rng = random.Random(seed)
        passes = int(gate_cfg.rounds)
        visits: list[list[int]] = []
        for pas in range(1, passes + 1):
            order = list(server.pids)
            if gate_cfg.roll_order == "shuffled":
                rng.shuffle(order)
            visits.append(order)
            losses = []
            for step, pid in enumerate(order, start=1):
                trained = server.train_on(self, pid, params, (pas - 1) * len(order) + step)
                if trained is None:  # the client failed: the gate moves on unchanged
                    continue
                params, loss = trained
                losses.append(loss)
                server.record_row(round=pas, client=pid, loss=loss)
            server.log_round(pas, passes, loss=float(np.mean(losses)) if losses else float("nan"))
        server.record("rollgate_order", visits)
        server.install(self, params)
