"""Stage 1: the shared feature extractor F, by FedAvg of the parts the method trains (F + head
for FedCE, F + projector for FedSC, all three for hybrid); the untrained part keeps its seeded
initialisation and never travels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nmoe.data import federation_spec, labelled, load_all_clients
from nmoe.device_data import load_device_data
from nmoe.gates import Params
from nmoe.models import build_bundle, load_numpy, stage1_keys, state_numpy
from nmoe.training import forward_batched, linear_probe
from nmoe_protocol import messages as wire

from ..rounds import FederatedRounds, weighted_score
from ..run import Run

CORRELATION_KEY = "corr"  # the key of a client's correlation matrix in its reply


def initial_bundle(run: Run, method: str) -> tuple[Params, list[str]]:
    """The seeded stage-1 bundle (every key) and the keys `method` trains and shares."""
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    return state_numpy(bundle), stage1_keys(bundle, method)


def probe_data(run: Run) -> tuple[torch.Tensor, ...] | None:
    """The linear probe's images: in simulation the pooled client training data and the global
    test set (a measurement; no client data crosses the network), else the server's own
    validation folder (`dataset.server_val_dir`), else none: the server holds no client data."""
    if run.simulated:
        clients = load_all_clients(federation_spec(run.cfg), run.directory.num_partitions)
        pooled = [labelled(c) for c in clients]
        return (
            torch.cat([p[0] for p in pooled]),
            torch.cat([p[1] for p in pooled]),
            clients[0].global_x,
            clients[0].global_y,
        )
    if run.cfg.dataset.server_val_dir:
        data, _ = load_device_data(
            Path(str(run.cfg.dataset.server_val_dir)),
            float(run.cfg.dataset.local_test_fraction),
            int(run.cfg.seed),
        )
        return data.train_x, data.train_y, data.test_x, data.test_y
    return None


def probe_accuracy(run: Run, params: Params, data: tuple[torch.Tensor, ...]) -> float:
    """Linear probe of F: trained on the probe data's training part, scored on its test part."""
    train_x, train_y, test_x, test_y = data
    bundle = build_bundle(run.cfg.model, run.image_shape, run.num_classes, int(run.cfg.seed))
    load_numpy(bundle, params)
    return linear_probe(
        forward_batched(bundle.fe, train_x),
        train_y,
        forward_batched(bundle.fe, test_x),
        test_y,
        num_classes=run.num_classes,
        epochs=int(run.cfg.fe.probe_epochs),
        lr=float(run.cfg.expert.lr),
        batch_size=int(run.cfg.expert.batch_size),
        seed=int(run.cfg.seed),
    )


class ExtractorRounds(FederatedRounds):
    """Rounds of `train.extractor` until convergence (`fe.patience`; the cap is `fe.rounds`, or
    `baseline.fedavg_rounds` for the FedAvg baseline's own FedCE run); with FedSC's shared
    correlations, each client gets the average of the other clients' matrices of the previous
    round."""

    reply_type = wire.ExtractorReply
    checkpoint_rounds = True

    def __init__(self, run: Run, stage: str, method: str, schedule: str = "fe") -> None:
        params, self.trained = initial_bundle(run, method)
        fe = run.cfg.fe
        rounds = int(fe.rounds) if schedule == "fe" else int(run.cfg.baseline.fedavg_rounds)
        super().__init__(run, stage, params, rounds, int(fe.patience), float(fe.min_delta))
        self.method = method
        self.schedule = schedule
        self.share_correlation = bool(fe.share_correlation) and method != "fedce"
        self.others: dict[int, Params] = {}
        self.probe: tuple[torch.Tensor, ...] | None = None  # read once, at the first round

    def shared_keys(self, rnd: int) -> list[str]:
        return self.trained

    def configure(self, rnd: int) -> dict[int, wire.ExtractorRequest]:
        params = {k: self.params[k] for k in self.trained}
        return {
            pid: wire.ExtractorRequest(
                method=self.method,
                server_round=rnd,
                params=params,
                schedule=self.schedule,
                others_correlation=self.others.get(pid),
            )
            for pid in self.run.pids
        }

    def validation_score(self, replies: dict[int, wire.ExtractorReply]) -> float | None:
        return weighted_score(replies)

    def after_round(self, rnd: int, replies: dict[int, wire.ExtractorReply]) -> dict[str, float]:
        if self.share_correlation:
            corr = {
                pid: r.correlation[CORRELATION_KEY]
                for pid, r in replies.items()
                if r.correlation and CORRELATION_KEY in r.correlation
            }
            self.others = {
                pid: {
                    CORRELATION_KEY: np.mean(
                        [c for p, c in corr.items() if p != pid], axis=0
                    ).astype(np.float32)
                }
                for pid in corr
                if len(corr) > 1
            }
        metrics: dict[str, float] = {}
        score = weighted_score(replies)
        if score is not None:
            metrics["val-score"] = score
        if self.method != "fedce":
            if self.probe is None:
                self.probe = probe_data(self.run) or ()
            if self.probe:
                metrics["probe-acc"] = probe_accuracy(self.run, self.params, self.probe)
        return metrics


def train_extractor(run: Run, method: str, stage: str, schedule: str = "fe") -> Params:
    """Stage 1 (or the FedAvg baseline's own FedCE run): every key of the final bundle."""
    return ExtractorRounds(run, stage, method, schedule).run_rounds()
