"""Baselines trained beside NMoE: each client's own head on the shared F (FedPer/FedRep shape),
local-only models, and the centralized reference on pooled data (simulation only)."""

from __future__ import annotations

import torch

from nmoe.data import federation_spec, labelled, load_all_clients
from nmoe.models import build_bundle, build_expert
from nmoe.training import (
    accuracy,
    forward_batched,
    train_classifier,
    train_supervised_until_converged,
)
from nmoe_protocol import messages as wire

from ..run import Run


def train_own_heads(run: Run) -> None:
    """`shared_fe_own_head`: every client fine-tunes the global head on its data."""
    run.broadcast(wire.OwnHeadRequest(), wire.ExpertReply)


def local_only(run: Run) -> None:
    """`local_only`: every client trains F + expert on its own data alone, to convergence."""
    replies = run.broadcast(wire.LocalOnlyRequest(), wire.Accuracies)
    run.results.set_accuracy(
        "local_only",
        {p: r.acc_local[0] for p, r in replies.items()},
        {p: r.acc_global[0] for p, r in replies.items() if r.acc_global},
    )
    run.results.set_extra_item(
        "convergence",
        "local_only",
        {
            "epochs_run": {str(p): r.epochs_run for p, r in replies.items()},
            "cap": int(run.cfg.baseline.epochs),
        },
    )


def centralized(run: Run) -> None:
    """Upper reference: one F + expert trained on the pooled training data (in the ServerApp), to
    convergence. Only in simulation: with devices holding their own data the server has none."""
    if not run.simulated:
        run.results.set_extra_item(
            "skipped", "centralized", "nodes hold their own data: the server pools nothing"
        )
        return
    cfg, b = run.cfg, run.cfg.baseline
    clients = load_all_clients(federation_spec(cfg), run.directory.num_partitions)
    pooled = [labelled(c) for c in clients]
    x, y = torch.cat([p[0] for p in pooled]), torch.cat([p[1] for p in pooled])
    bundle = build_bundle(cfg.model, run.image_shape, run.num_classes, int(cfg.seed))
    info = train_supervised_until_converged(
        bundle,
        x,
        y,
        max_epochs=int(b.epochs),
        patience=int(b.patience),
        val_fraction=float(b.val_fraction),
        lr=float(cfg.fe.lr),
        momentum=float(cfg.fe.momentum),
        batch_size=int(cfg.fe.batch_size),
        seed=int(cfg.seed),
    )
    expert = build_expert(cfg.model, run.num_classes, int(cfg.seed))
    train_classifier(
        expert,
        forward_batched(bundle.fe, x),
        y,
        epochs=int(cfg.expert.epochs),
        lr=float(cfg.expert.lr),
        batch_size=int(cfg.expert.batch_size),
        seed=int(cfg.seed),
    )
    model = lambda inp: expert(bundle.fe(inp))
    local = {
        pid: accuracy(forward_batched(model, c.test_x), c.test_y) for pid, c in enumerate(clients)
    }
    glob = accuracy(forward_batched(model, clients[0].global_x), clients[0].global_y)
    run.results.set_accuracy("centralized", local, {pid: glob for pid in local})
    run.results.set_extra_item("convergence", "centralized", {**info, "cap": int(b.epochs)})
