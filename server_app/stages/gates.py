"""Stage 3: the gates. Each gate's module (nmoe/gates/) says how it trains; this module offers it
the server's operations (`GateServer`): federated rounds over its shared keys, one client's
turn, installing its shared part everywhere. Before any gate trains, every client fetches once
the logits of every reachable expert on its gate-training split (three routed waves)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from nmoe.gates import Gate, Params
from nmoe_protocol import messages as wire

from ..rounds import FederatedRounds
from ..run import Run


def held_splits(run: Run, pid: int, splits: list[str]) -> list[int]:
    """Positions in `splits` of the splits node `pid` holds (a device may hold no global set)."""
    info = run.directory.info[pid]
    sizes = {"test": info.num_test, "global": info.num_global}
    return [i for i, split in enumerate(splits) if sizes.get(split, 1) > 0]


def route_requests(
    run: Run, query_id: str, splits: list[str], mode: str, gate: str, seed: int = 0
) -> dict[int, wire.RouteRequest]:
    """One routed query per client over the `splits` it holds (coalesced: one set of waves
    answers them all)."""
    if isinstance(splits, str):
        raise TypeError(f"splits must be a list of split names, got the string '{splits}'")
    requests = {}
    for pid in run.pids:
        held = [splits[i] for i in held_splits(run, pid, splits)]
        if held:
            requests[pid] = wire.RouteRequest(
                query_id=query_id,
                splits=held,
                mode=mode,
                gate=gate,
                neighbours=run.neighbours[pid],
                seed=seed,
            )
    return requests


def fill_gate_cache(run: Run) -> list[int]:
    """Fetch every reachable expert's logits on each client's gate-training features once;
    returns the clients that hold their cache (a node whose policy keeps its `gate` split
    refuses)."""
    query = f"cache-{uuid.uuid4().hex[:8]}"
    outcome = run.router.run(route_requests(run, query, ["gate"], "cache", "cache"))
    run.results.set_extra(
        "gate_cache", {"clients": sorted(outcome.reports), "failed_experts": outcome.failed_experts}
    )
    return sorted(outcome.reports)


class GateRounds(FederatedRounds):
    """Rounds of `train.gate`: round 1 sends the initial gate, round r > 1 the keys averaged in
    round r - 1; the gate's module says which keys each round averages."""

    def __init__(
        self,
        run: Run,
        gate: Gate,
        initial: Params,
        rounds: int,
        shared_keys: Callable[[int], list[str]],
    ) -> None:
        super().__init__(run, gate.name, initial, rounds)
        self.gate = gate
        self._shared_keys = shared_keys

    def shared_keys(self, rnd: int) -> list[str]:
        return self._shared_keys(rnd)

    def configure(self, rnd: int) -> dict[int, wire.GateRequest]:
        keys = sorted(self.params) if rnd == 1 else self._shared_keys(rnd - 1)
        request = wire.GateRequest(
            gate=self.gate.name, server_round=rnd, params={k: self.params[k] for k in keys}
        )
        return {pid: request for pid in self.run.pids}


class StageGateServer:
    """The `GateServer` a gate's module trains through, for one run."""

    def __init__(self, run: Run, stage: str) -> None:
        self.run = run
        self.stage = stage

    @property
    def pids(self) -> list[int]:
        return self.run.pids

    def federated_rounds(
        self, gate: Gate, initial: Params, rounds: int, shared_keys: Callable[[int], list[str]]
    ) -> Params:
        return GateRounds(self.run, gate, initial, rounds, shared_keys).run_rounds()

    def train_on(
        self, gate: Gate, pid: int, params: Params, server_round: int
    ) -> tuple[Params, float] | None:
        request = wire.GateRequest(gate=gate.name, server_round=server_round, params=params)
        reply = self.run.wave({pid: request}, wire.TrainReply).get(pid)
        return None if reply is None else (reply.params, reply.loss)

    def install(self, gate: Gate, params: Params) -> None:
        request = wire.InstallRequest(part="gate", params=params, gate=gate.name)
        self.run.broadcast(request, wire.Installed)

    def record(self, key: str, value: Any) -> None:
        self.run.results.set_extra(key, value)

    def record_row(self, **row: Any) -> None:
        self.run.results.log_round(stage=self.stage, **row)

    def log_round(self, rnd: int, total: int, **metrics: float) -> None:
        self.run.progress.round(self.stage, rnd, total, metrics)


def train_gate(run: Run, gate: Gate) -> None:
    """Stage 3 for one gate, as its module defines it."""
    cfg = run.cfg
    gate.train_federated(
        StageGateServer(run, gate.name), cfg.gate, cfg.model, run.num_experts, int(cfg.seed)
    )
