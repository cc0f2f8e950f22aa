"""Stage 1: the shared feature extractor F, by FedAvg of the parts the method trains (F + head
for FedCE, F + projector for FedSC, all three for hybrid); the untrained part keeps its seeded
initialisation and never travels.

FedSC with shared correlations (as the FedSC reference does it): every round starts with a
`train.correlation` wave in which each client computes its correlation matrix of the fresh global
model; the server sends each client the average of the *other* clients' matrices (C_ext) with
the round's alpha (ramped from 1 to `fe.alpha_min` over `fe.rounds`) in its `train.extractor`.

Every round of stage 1 (every method) and the random initialisation are scored by the linear
probe of `nmoe/probe.py` on data the server may hold (see `probe_data`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nmoe.data import federation_spec, labelled, load_all_clients
from nmoe.device_data import load_device_data
from nmoe.gates import Params
from nmoe.models import build_bundle, load_numpy, stage1_keys, state_numpy
from nmoe.probe import PROBE_C, PROBE_MAX_ITER, PROBE_TOL, linear_probe
from nmoe.ssl import shared_alpha
from nmoe.training import forward_batched
from nmoe_protocol import messages as wire
from nmoe_strategy.strategy import SharedKeyStrategy, flower_strategy

from ..rounds import FederatedRounds, weighted_score
from ..run import Run

CORRELATION_KEY = "corr"  # the key of a client's correlation matrix in its reply


def initial_bundle(run: Run, method: str) -> tuple[Params, list[str]]:
    """The seeded stage-1 bundle (every key) and the keys `method` trains and shares."""
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    return state_numpy(bundle), stage1_keys(bundle, method)


def probe_data(run: Run) -> tuple[tuple[torch.Tensor, ...], str] | None:
    """The linear probe's images and where they come from: in simulation the pooled *labelled*
    client training images (`dataset.label_fraction` applies) and the global test set (a
    measurement made in the ServerApp; no client data crosses the network), else the server's
    own folder (`dataset.server_val_dir`: its train and test parts), else none: outside
    simulation the server pools no client data."""
    if run.simulated:
        clients = load_all_clients(federation_spec(run.cfg), run.directory.num_partitions)
        pooled = [labelled(c) for c in clients]
        data = (
            torch.cat([p[0] for p in pooled]),
            torch.cat([p[1] for p in pooled]),
            clients[0].global_x,
            clients[0].global_y,
        )
        return data, "simulation: pooled labelled client training images -> global test set"
    if run.cfg.dataset.server_val_dir:
        folder = Path(str(run.cfg.dataset.server_val_dir))
        server, _ = load_device_data(
            folder, float(run.cfg.dataset.local_test_fraction), int(run.cfg.seed)
        )
        x, y = labelled(server)
        return (x, y, server.test_x, server.test_y), "dataset.server_val_dir (train -> test)"
    return None


def probe_accuracy(run: Run, params: Params, data: tuple[torch.Tensor, ...]) -> float:
    """Linear probe of F (`nmoe.probe.linear_probe`): trained on the probe data's training part,
    scored on its test part."""
    train_x, train_y, test_x, test_y = data
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    load_numpy(bundle, params, strict=False)
    return linear_probe(
        forward_batched(bundle.fe, train_x), train_y, forward_batched(bundle.fe, test_x), test_y
    )


class ExtractorRounds(FederatedRounds):
    """Rounds of `train.extractor` until convergence (`fe.patience`; the cap is `fe.rounds`, or
    `baseline.fedavg_rounds` for the FedAvg baseline's own FedCE run)."""

    reply_type = wire.ExtractorReply
    checkpoint_rounds = True

    def __init__(self, run: Run, stage: str, method: str, schedule: str = "fe") -> None:
        params, self.trained = initial_bundle(run, method)
        fe = run.cfg.fe
        rounds = int(fe.rounds) if schedule == "fe" else int(run.cfg.baseline.fedavg_rounds)
        super().__init__(run, stage, params, rounds, int(fe.patience), float(fe.min_delta))
        if schedule == "fe" and float(fe.server_momentum) > 0:  # FedAvgM for stage 1 only
            inner = flower_strategy("fedavg", server_momentum=float(fe.server_momentum))
            self.strategy = SharedKeyStrategy(inner, run.strategy.min_reply_fraction)
        self.method = method
        self.schedule = schedule
        self.share_correlation = bool(fe.share_correlation) and method != "fedce"
        self.probe_every = int(fe.probe_every) if schedule == "fe" else 0
        self.probe: tuple[tuple[torch.Tensor, ...], str] | None | bool = False  # False: unread

    def shared_keys(self, rnd: int) -> list[str]:
        return self.trained

    def correlations(self, rnd: int, params: Params) -> dict[int, Params]:
        """The `train.correlation` wave: each client's C of `params`; returns, per client that
        answered, the mean of the *other* clients' matrices (none if fewer than two answered)."""
        request = wire.CorrelationRequest(server_round=rnd, params=params)
        replies = self.run.wave({pid: request for pid in self.run.pids}, wire.CorrelationReply, rnd)
        corr = {}
        for pid, reply in replies.items():
            value = np.asarray(reply.correlation.get(CORRELATION_KEY))
            if value.ndim == 2 and value.shape[0] == value.shape[1] and np.isfinite(value).all():
                corr[pid] = value.astype(np.float64)
        if len(corr) < 2:
            return {}
        total = sum(corr.values())
        return {
            pid: {CORRELATION_KEY: ((total - c) / (len(corr) - 1)).astype(np.float32)}
            for pid, c in corr.items()
        }

    def configure(self, rnd: int) -> dict[int, wire.ExtractorRequest]:
        params = {k: self.params[k] for k in self.trained}
        others: dict[int, Params] = {}
        alpha = 1.0
        if self.share_correlation:
            others = self.correlations(rnd, params)
            alpha = shared_alpha(
                min(rnd, self.rounds) - 1, self.rounds, alpha_min=float(self.run.cfg.fe.alpha_min)
            )
        return {
            pid: wire.ExtractorRequest(
                method=self.method,
                server_round=rnd,
                params=params,
                schedule=self.schedule,
                others_correlation=others.get(pid),
                alpha=alpha if pid in others else 1.0,
            )
            for pid in self.run.pids
        }

    def validation_score(self, replies: dict[int, wire.ExtractorReply]) -> float | None:
        return weighted_score(replies)

    def probe_set(self) -> tuple[tuple[torch.Tensor, ...], str] | None:
        """The probe's data, read once (None: the server may hold none)."""
        if self.probe is False:
            self.probe = probe_data(self.run)
            if self.probe is not None:
                self.reference_probe()
        return self.probe  # type: ignore[return-value]

    def reference_probe(self) -> None:
        """The probe of the randomly initialised extractor (the reference row), and the
        protocol, in `extra.probe`."""
        assert self.probe
        data, source = self.probe
        start = time.perf_counter()
        initial, _ = initial_bundle(self.run, self.method)
        accuracy = probe_accuracy(self.run, initial, data)
        self.run.results.set_extra_item(
            "probe",
            "protocol",
            {
                "data": source,
                "train_images": len(data[1]),
                "test_images": len(data[3]),
                "model": "logistic regression (L-BFGS) on standardised features",
                "C": PROBE_C,
                "max_iter": PROBE_MAX_ITER,
                "tol": PROBE_TOL,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
        self.run.results.set_extra_item("probe", "random_init", accuracy)

    def after_round(self, rnd: int, replies: dict[int, wire.ExtractorReply]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        score = weighted_score(replies)
        if score is not None:
            metrics["val-score"] = score
        if self.probe_every and rnd % self.probe_every == 0:
            probe = self.probe_set()
            if probe:
                metrics["probe-acc"] = probe_accuracy(self.run, self.params, probe[0])
        return metrics

    def result(self, last_round: int) -> Params:
        params = super().result(last_round)
        probe = self.probe_set() if self.probe_every else None
        if probe:
            accuracy = probe_accuracy(self.run, params, probe[0])
            self.run.results.set_extra_item("probe", self.stage, accuracy)
        return params


def train_extractor(run: Run, method: str, stage: str, schedule: str = "fe") -> Params:
    """Stage 1 (or the FedAvg baseline's own FedCE run): every key of the final bundle."""
    return ExtractorRounds(run, stage, method, schedule).run_rounds()
