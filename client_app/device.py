"""`nmoe-device serve`: answer new inputs on the device itself, without waiting for the federation.

    nmoe-device serve --node-config "partition-id=0 num-partitions=3 state-dir='/var/lib/nmoe'" \
        --state-key fleet1 [--once] [--interval 0.2]

It loads the personal state a training run saved under `state_key` once (the same node config
as the device's SuperNode: its data, policy, inbox and outbox), then watches the inbox: a file
familiar to the device's own training data (local-first: within the `gate.local_first_quantile`
of its nearest-neighbour distances, or the node's `min-local-first`, and passing the class check
`gate.local_first_class_confidence` if set) is answered at once on the device, as the routed query
answers its local-first rows (its local head where it has one, else its expert; then the gate's
wave-3 blend, e.g. KnowGate's towards the task's label prior, the files of one step being the
task); the others are handed to the federation (`<inbox>/federated/`), which answers them in its
next serving waves (`mode=serve`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.config import parse_config_args
from safetensors import safe_open

from nmoe import gates
from nmoe.pipeline import PendingQuery, finish_query, plan_query
from nmoe.routing import own_spread_of
from nmoe.training import forward_batched

from .node import Node, open_node
from .state import CONFIG_KEY, PersonalState


class DeviceService:
    """The device's personal state in memory, answering its inbox."""

    def __init__(self, node_config: dict[str, Any], state_key: str) -> None:
        self.node = load_node(node_config, state_key)
        node = self.node
        self.inbox = node.inbox()
        self.fe = node.extractor()
        self.experts = node.local_experts()  # its own expert and the shared slot
        self.own_model = node.own_model()  # None: its expert answers its own rows
        gate = gates.get(str(node.cfg.gate.method))
        self.gate_name = gate.name
        self.shift = node.prior_shift(gate)  # None for gates with no wave-3 blend
        quantile = node.policy.local_first(float(node.cfg.gate.local_first_quantile))
        self.quantile = quantile
        self.own_feats = forward_batched(self.fe, node.data.train_x) if quantile > 0 else None
        # the own features never change while the service runs: their spread is computed once
        self.own_spread = own_spread_of(self.own_feats) if self.own_feats is not None else None

    def step(self) -> dict[str, int]:
        """Answer or hand over every file that landed since the last step."""
        items = self.inbox.admit(self.inbox.new())  # a bad file is refused, never batched
        if not items:
            return {"device": 0, "federated": 0}
        feats = forward_batched(self.fe, self.inbox.read(items))
        if self.own_feats is None:
            local = torch.zeros(len(items), dtype=torch.bool)
        else:
            local = self.node.local_rows(feats, self.own_feats, self.quantile, self.own_spread)
        chosen = [i for i, keep in zip(items, local.tolist(), strict=True) if keep]
        if chosen:
            self.inbox.answer(chosen, self.answer(feats[local]), "device")
        for item, keep in zip(items, local.tolist(), strict=True):
            if not keep:
                self.inbox.defer(item)
        return {"device": len(chosen), "federated": len(items) - len(chosen)}

    def answer(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities for rows kept on the device: waves 1 and 3 of a routed query
        whose rows all stay local (no wave 2)."""
        node, rows = self.node, len(feats)
        weights = torch.zeros(rows, node.num_experts)
        everything = torch.ones(rows, dtype=torch.bool)
        plan = plan_query(feats, weights, self.experts, node.pid, everything, self.own_model)
        labels = torch.zeros(rows, dtype=torch.long)  # unknown: the accuracy is not used
        pending = PendingQuery(plan, labels, [rows], "serve", self.gate_name)
        (report,) = finish_query(pending, {}, node.num_classes, node.pid, prior_shift=self.shift)
        return report.probabilities


def load_node(node_config: dict[str, Any], state_key: str) -> Node:
    """The node as its saved state describes it: the run config kept in the state file."""
    state_dir = node_config.get("state-dir")
    if not state_dir:
        raise SystemExit("nmoe-device needs the node config's state-dir")
    pid = int(node_config.get("partition-id", 0))
    path = Path(str(state_dir)) / state_key / f"partition-{pid}.safetensors"
    if not path.is_file():
        raise SystemExit(f"no saved state at {path}: train with state_key={state_key} first")
    with safe_open(str(path), framework="pt") as handle:
        config_json = (handle.metadata() or {}).get("config")
    if not config_json:
        raise SystemExit(f"{path} holds no run config")
    context = Context(
        run_id=0, node_id=0, node_config=dict(node_config), state=RecordDict(), run_config={}
    )
    context.state[CONFIG_KEY] = ConfigRecord({"json": config_json})
    PersonalState(context)  # reads the saved personal state back into the context
    return open_node(context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nmoe-device", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="answer the inbox (familiar inputs on the device)")
    serve.add_argument("--node-config", required=True, help="as given to flower-supernode")
    serve.add_argument("--state-key", required=True, help="the training run's state_key")
    serve.add_argument("--once", action="store_true", help="one pass over the inbox, then exit")
    serve.add_argument("--interval", type=float, default=0.2, help="seconds between inbox checks")
    args = parser.parse_args(argv)
    service = DeviceService(parse_config_args([args.node_config]), args.state_key)
    print(
        f"nmoe-device: serving {service.inbox.inbox} -> {service.inbox.outbox} "
        f"(local-first quantile {service.quantile})",
        flush=True,
    )
    while True:
        counts = service.step()
        if counts["device"] or counts["federated"]:
            print(json.dumps(counts), flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
