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

from nmoe.convergence import Patience
from nmoe.gates import Params
from nmoe_protocol.codec import WireMessage
from nmoe_protocol.messages import TrainReply

from .run import Run, StageFailed


def kebab(name: str) -> str:
    """History metric names as results.json has them (`test_acc` -> `test-acc`)."""
    return name.replace("_", "-")


def weighted_score(replies: dict[int, TrainReply]) -> float | None:
    """The clients' validation scores averaged by their training examples (None: none sent)."""
    scored = [(r.val_score, r.num_examples) for r in replies.values() if r.val_score is not None]
    if not scored:
        return None
    return sum(v * n for v, n in scored) / max(sum(n for _, n in scored), 1)


class FederatedRounds:
    """`rounds` rounds of one training message over every client; `params` is the server's
    copy of every key (only the shared ones change)."""

    reply_type: type[TrainReply] = TrainReply
    checkpoint_rounds = False  # server-side state only: a resumed run continues mid-stage

    def __init__(
        self,
        run: Run,
        stage: str,
        params: Params,
        rounds: int,
        patience: int = 0,
        min_delta: float = 0.0,
    ) -> None:
        self.run = run
        self.stage = stage
        self.params = dict(params)
        self.rounds = rounds
        self.patience = Patience(patience, min_delta)
        self.best = dict(params)  # the parameters of the best round so far
        self.strategy = run.strategy  # a stage may aggregate with its own (see ExtractorRounds)

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

    def validation_score(self, replies: dict[int, TrainReply]) -> float | None:
        """The validation score (higher is better) of the parameters the round's clients
        received, before their local update, for early stopping; None: no rule."""
        return None

    # ---------------------------------------------------------------- the loop
    def first_round(self) -> int:
        done = self.run.checkpoint.round_done(self.stage) if self.checkpoint_rounds else 0
        if done:
            arrays = self.run.checkpoint.arrays
            self.params = {k: v.numpy() for k, v in arrays[f"{self.stage}:partial"].items()}
            self.best = {k: v.numpy() for k, v in arrays.get(f"{self.stage}:best", {}).items()}
            momentum = arrays.get(f"{self.stage}:momentum", {})
            self.strategy.restore_momentum({k: v.numpy() for k, v in momentum.items()})
            saved = self.run.checkpoint.in_progress.get("patience")
            if saved:
                self.patience = Patience.restore(
                    self.patience.patience, self.patience.min_delta, saved
                )
            log(INFO, "[%s] resuming after round %d", self.stage, done)
        return done + 1

    def send_round(self, rnd: int) -> dict[int, Any]:
        """Send round `rnd`, retrying up to `round_retries` times while too few clients answer."""
        cfg, strategy = self.run.cfg, self.strategy
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
        first = self.first_round()
        rnd = first - 1
        for rnd in range(first, self.rounds + 1):
            received = dict(self.params)  # what the clients start round `rnd` from
            replies = self.send_round(rnd)
            outcome = self.strategy.aggregate(
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
            score = self.validation_score(valid)
            if score is not None:
                # the clients score what they received, so round `rnd` scores the aggregate of
                # round `rnd - 1` (the initial parameters of round 1 are not a candidate)
                row["val-score"] = score  # the score the patience rule sees, not a re-average
                if rnd > 1 and self.patience.update(rnd - 1, score):
                    self.best = received
            run.results.log_round(stage=self.stage, round=rnd, replies=len(valid), **row)
            run.progress.round(self.stage, rnd, self.rounds, row)
            run.progress.clients(
                self.stage,
                rnd,
                {pid: {"loss": r.loss, "num-examples": r.num_examples} for pid, r in valid.items()},
            )
            if self.checkpoint_rounds:
                self.save(rnd)
            if self.patience.stop:
                log(
                    INFO,
                    "[%s] converged: no improvement for %d rounds, keeping round %d",
                    self.stage,
                    self.patience.patience,
                    self.patience.best_step,
                )
                break
        return self.result(rnd)

    def result(self, last_round: int) -> Params:
        """The stage's parameters: the best scored aggregate under a patience rule (the last
        round's aggregate is scored by no round after it), else the last."""
        if self.patience.best_step == 0:
            return self.params
        self.run.results.set_extra_item(
            "convergence",
            self.stage,
            {
                "rounds_run": last_round,
                "cap": self.rounds,
                "best_round": self.patience.best_step,
                "best_validation": self.patience.best,
                "stopped_early": self.patience.stop,
                "validation": self.patience.history,
            },
        )
        return self.best

    def save(self, rnd: int) -> None:
        """Checkpoint the round: current and best parameters, server momentum, patience state."""
        run = self.run
        run.checkpoint.in_progress = {
            "stage": self.stage,
            "round": rnd,
            "patience": self.patience.as_dict(),
        }
        states = [("partial", self.params), ("best", self.best)]
        momentum = self.strategy.momentum()
        for name, params in states + ([("momentum", momentum)] if momentum else []):
            run.checkpoint.arrays[f"{self.stage}:{name}"] = ArrayRecord(
                {k: Array(np.asarray(v)) for k, v in params.items()}
            )
        run.save_checkpoint()
