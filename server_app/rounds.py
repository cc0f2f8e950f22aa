"""Federated rounds in the shape of Flower's Strategy: configure, send and receive, aggregate.

A stage that averages shared parameters over several rounds subclasses `FederatedRounds` and
fills in the hooks: `configure` (each client's request for a round), `shared_keys` (what the
round averages), and optionally `after_round` (stage bookkeeping, extra history metrics). The
loop retries a round that got too few replies, records who dropped, aggregates through the
run's `SharedKeyStrategy`, logs progress and, with `checkpoint_rounds`, checkpoints every round
so a resumed run continues after the last one completed.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log

from nmoe.gates import Params
from nmoe_protocol.codec import WireMessage
from nmoe_protocol.messages import TrainReply

from .run import Run, StageFailed


def kebab(name: str) -> str:
    """History metric names as results.json has them (`test_acc` -> `test-acc`)."""
    return name.replace("_", "-")


class FederatedRounds:
    """`rounds` rounds of one training message over every client; `params` is the server's
    copy of every key (only the shared ones change)."""

    reply_type: type[TrainReply] = TrainReply
    checkpoint_rounds = False  # server-side state only: a resumed run continues mid-stage

    def __init__(self, run: Run, stage: str, params: Params, rounds: int) -> None:
        self.run = run
        self.stage = stage
        self.params = dict(params)
        self.rounds = rounds

    # ---------------------------------------------------------------- hooks
    def configure(self, rnd: int) -> dict[int, WireMessage]:
        """Each client's request for round `rnd` (by partition id)."""
        raise NotImplementedError

    def shared_keys(self, rnd: int) -> list[str]:
        """The keys round `rnd` averages."""
        return sorted(self.params)

    def after_round(self, rnd: int, replies: dict[int, TrainReply]) -> dict[str, float]:
        """Stage bookkeeping after round `rnd`'s aggregation; extra metrics for the history."""
        return {}

    # ---------------------------------------------------------------- the loop
    def first_round(self) -> int:
        done = self.run.checkpoint.round_done(self.stage) if self.checkpoint_rounds else 0
        if done:
            saved = self.run.checkpoint.arrays[f"{self.stage}:partial"]
            self.params = {k: v.numpy() for k, v in saved.items()}
            log(INFO, "[%s] resuming after round %d", self.stage, done)
        return done + 1

    def send_round(self, rnd: int) -> dict[int, Any]:
        """Send round `rnd`, retrying up to `round_retries` times while too few clients answer."""
        cfg, strategy = self.run.cfg, self.run.strategy
        for attempt in range(int(cfg.round_retries) + 1):
            requests = self.configure(rnd)
            replies = self.run.wave_messages(requests, self.reply_type, rnd)
            if strategy.enough_replies(len(replies), len(requests)):
                return replies
            log(
                WARNING,
                "[%s] round %d: %d/%d replies (< %.0f%%), attempt %d",
                self.stage,
                rnd,
                len(replies),
                len(requests),
                100 * strategy.min_reply_fraction,
                attempt + 1,
            )
        raise StageFailed(
            f"stage '{self.stage}' round {rnd}: too few replies after {cfg.round_retries} retries"
        )

    def run_rounds(self) -> Params:
        """Every round; returns the server's copy of every key."""
        run = self.run
        max_examples = {pid: info.num_train for pid, info in run.directory.info.items()}
        for rnd in range(self.first_round(), self.rounds + 1):
            replies = self.send_round(rnd)
            outcome = run.strategy.aggregate(
                rnd, replies, self.shared_keys(rnd), self.params, max_examples
            )
            if outcome.rejected:
                run.results.record_dropped(self.stage, sorted(outcome.rejected), rnd)
            valid = {
                pid: reply for pid, (_, reply) in replies.items() if pid not in outcome.rejected
            }
            if outcome.params is None:
                raise StageFailed(f"stage '{self.stage}' round {rnd}: no valid reply to aggregate")
            self.params.update(outcome.params)
            row = {kebab(k): v for k, v in outcome.metrics.items() if k != "num_examples"}
            row.update(self.after_round(rnd, valid))
            run.results.log_round(stage=self.stage, round=rnd, replies=len(valid), **row)
            run.progress.round(self.stage, rnd, self.rounds, row)
            run.progress.clients(
                self.stage,
                rnd,
                {pid: {"loss": r.loss, "num-examples": r.num_examples} for pid, r in valid.items()},
            )
            if self.checkpoint_rounds:
                run.checkpoint.in_progress = {"stage": self.stage, "round": rnd}
                run.checkpoint.arrays[f"{self.stage}:partial"] = ArrayRecord(
                    {k: Array(np.asarray(v)) for k, v in self.params.items()}
                )
                run.save_checkpoint()
        return self.params
