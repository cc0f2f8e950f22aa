"""FedGate: each client trains its gate locally; the server averages only the shared part, the
trunk every `sync_trunk_every` rounds and the output layer every `sync_head_every` rounds
(0 = never: that part stays personal). Partial synchronisation, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import GateServer, MLPGate

TRUNK, HEAD = "trunk.", "head."


def sync_due(rnd: int, every: int) -> bool:
    """Whether a part synchronised every `every` rounds (0 = never) is averaged in round `rnd`."""
    return every > 0 and rnd % every == 0


@dataclass
class FedGateOptions:
    sync_trunk_every: int = 4  # average the trunk every s rounds (0 = never)
    sync_head_every: int = 2  # average the output layer every s rounds (0 = never)


class FedGate(MLPGate):
    name = "fedgate"
    Options = FedGateOptions

    def validate(self, cfg: Any, used: bool, require: Any) -> None:
        gate_cfg = cfg.gate
        for key in ("sync_trunk_every", "sync_head_every"):
            value = gate_cfg[key]
            require(value >= 0, f"gate.{key}", f"must be >= 0, got {value}")

    def shared_keys(self, gate_cfg: Any, server_round: int, keys: list[str]) -> list[str]:
        trunk = sync_due(server_round, int(gate_cfg.sync_trunk_every))
        head = sync_due(server_round, int(gate_cfg.sync_head_every))
        return [k for k in keys if (k.startswith(TRUNK) and trunk) or (k.startswith(HEAD) and head)]

    def installable_keys(self, gate_cfg: Any, keys: list[str]) -> list[str]:
        trunk, head = int(gate_cfg.sync_trunk_every) > 0, int(gate_cfg.sync_head_every) > 0
        return [k for k in keys if (k.startswith(TRUNK) and trunk) or (k.startswith(HEAD) and head)]

    def train_federated(
        self, server: GateServer, gate_cfg: Any, model_cfg: Any, num_experts: int, seed: int
    ) -> None:
        initial = self.initial_params(model_cfg, num_experts, seed)
        keys = sorted(initial)
        rounds = int(gate_cfg.rounds)
        final = server.federated_rounds(
            self, initial, rounds, lambda rnd: self.shared_keys(gate_cfg, rnd, keys)
        )
        last = self.shared_keys(gate_cfg, rounds, keys)
        if last:  # every client ends with the last synchronised part
            server.install(self, {k: final[k] for k in last})
