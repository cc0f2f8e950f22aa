"""Baselines trained beside NMoE: each client's own head on the shared F (FedPer/FedRep shape),
local-only models, and the centralized reference on pooled data (simulation only)."""

from __future__ import annotations

import torch

from nmoe.data import federation_spec, load_all_clients
from nmoe.models import build_bundle, build_expert
from nmoe.training import accuracy, forward_batched, train_classifier, train_extractor
from nmoe_protocol import messages as wire

from ..run import Run


def train_own_heads(run: Run) -> None:
    """`shared_fe_own_head`: every client fine-tunes the global head on its data."""
    run.broadcast(wire.OwnHeadRequest(), wire.ExpertReply)


def local_only(run: Run) -> None:
    """`local_only`: every client trains F + expert on its own data alone."""
    replies = run.broadcast(wire.LocalOnlyRequest(), wire.Accuracies)
    run.results.set_accuracy(
        "local_only",
        {p: r.acc_local[0] for p, r in replies.items()},
        {p: r.acc_global[0] for p, r in replies.items()},
    )


def centralized(run: Run) -> None:
    """Upper reference: one F + expert trained on the pooled training data (in the ServerApp)."""
    cfg = run.cfg
    clients = load_all_clients(federation_spec(cfg), run.directory.num_partitions)
    x = torch.cat([c.train_x for c in clients])
    y = torch.cat([c.train_y for c in clients])
    bundle = build_bundle(cfg.model, run.image_shape, run.num_classes, int(cfg.seed))
    epochs = max(1, int(cfg.fe.rounds) * int(cfg.fe.local_epochs))
    train_extractor(
        bundle,
        x,
        y,
        method="fedce",
        epochs=epochs,
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
