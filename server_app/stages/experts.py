"""Stage 2: every client installs the final F and trains its personal expert on its features (F
frozen); experts never leave the clients. With `expert=with_shared` a shared expert H_0 is
trained by FedAvg and installed everywhere when something uses it: the mixture's shared slot
(`expert.shared_model=expert`; with `stage1` stage 1's head fills it) or
`expert.init_from_shared` (every personal expert starts from it)."""

from __future__ import annotations

import numpy as np

from nmoe.gates import Params
from nmoe.models import build_expert, state_numpy
from nmoe_protocol import messages as wire

from ..rounds import FederatedRounds, weighted_score
from ..run import Run


class SharedExpertRounds(FederatedRounds):
    """`expert.shared_rounds` FedAvg rounds of the shared expert H_0."""

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        expert = build_expert(cfg.model, run.num_classes, int(cfg.seed))
        super().__init__(
            run,
            "shared_expert",
            state_numpy(expert),
            int(cfg.expert.shared_rounds),
            int(cfg.fe.patience),
            float(cfg.fe.min_delta),
        )

    def configure(self, rnd: int) -> dict[int, wire.SharedExpertRequest]:
        request = wire.SharedExpertRequest(server_round=rnd, params=self.params)
        return {pid: request for pid in self.run.pids}

    def validation_score(self, replies: dict[int, wire.TrainReply]) -> float | None:
        return weighted_score(replies)


def install(run: Run, part: str, params: Params, gate: str | None = None) -> None:
    """Every client installs a shared part the server holds."""
    run.broadcast(wire.InstallRequest(part=part, params=params, gate=gate), wire.Installed)


def train_experts(run: Run, extractor: Params, trained_keys: list[str]) -> None:
    """Install F; train (and install) H_0 if configured; train every personal expert."""
    cfg = run.cfg
    install(run, "fe", {k: extractor[k] for k in trained_keys})
    if cfg.expert.shared_expert and (
        cfg.expert.shared_model == "expert" or cfg.expert.init_from_shared
    ):
        shared = SharedExpertRounds(run).run_rounds()
        install(run, "shared_expert", shared)
    init = "shared" if cfg.expert.init_from_shared else "scratch"
    replies = run.broadcast(wire.ExpertRequest(init=init), wire.ExpertReply)
    mean_acc = float(np.mean([r.test_acc for r in replies.values()])) if replies else float("nan")
    run.results.log_round(stage="expert", round=1, replies=len(replies), **{"test-acc": mean_acc})
