"""Aggregation of the shared keys only, by a Flower strategy (FedAvg by default).

`SharedKeyStrategy` validates every training reply before anything is aggregated: it must hold
exactly the keys the stage declares shared, each with the shape of the server's copy and finite
values, and a `num_examples` no larger than what the node reported at set-up. A reply that fails
is dropped (and named); the valid ones, reduced to the shared keys, go to the Flower strategy's
own `aggregate_train` (FedAvg, FedMedian or FedTrimmedAvg: `aggregation=` in the config).
Everything personal (experts, personal gate parts, correlation statistics) is dropped before
aggregation, so no such value is ever held by the server's model state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Strategy

from nmoe.config import AGGREGATIONS
from nmoe_protocol.messages import TrainReply

PARAMS = "params"
METRICS = "metrics"
NUM_EXAMPLES = "num_examples"


def flower_strategy(
    aggregation: str, trim_fraction: float = 0.2, server_momentum: float = 0.0
) -> Strategy:
    """The Flower strategy that averages the validated shared keys (FedAvgM where FedAvg is
    given a server momentum)."""
    common = {"weighted_by_key": NUM_EXAMPLES, "arrayrecord_key": PARAMS}
    if aggregation == "fedavg":
        if server_momentum > 0:
            return FedAvgM(server_momentum=server_momentum, **common)
        return FedAvg(**common)
    if aggregation == "median":
        return FedMedian(**common)
    if aggregation == "trimmed_mean":
        return FedTrimmedAvg(beta=trim_fraction, **common)
    raise ValueError(f"unknown aggregation '{aggregation}', allowed: {', '.join(AGGREGATIONS)}")


@dataclass
class Aggregate:
    """A round's outcome: the new shared keys, the averaged metrics, the replies refused."""

    params: dict[str, np.ndarray] | None
    metrics: dict[str, float]
    rejected: dict[int, str]


def numeric_fields(reply: TrainReply) -> dict[str, int | float]:
    """The reply's numeric metrics (`num_examples`, losses, accuracies), finite ones only."""
    out: dict[str, int | float] = {}
    for f in dataclasses.fields(reply):
        value = getattr(reply, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[f.name] = value
    return out


class SharedKeyStrategy:
    """Validates replies and aggregates exactly the shared keys with a Flower strategy."""

    def __init__(self, inner: Strategy | None = None, min_reply_fraction: float = 1.0) -> None:
        self.inner = inner or flower_strategy("fedavg")
        self.min_reply_fraction = min_reply_fraction

    def momentum(self) -> dict[str, np.ndarray]:
        """The server momentum by key (FedAvgM after its first round; else nothing), for a
        checkpoint."""
        vector = getattr(self.inner, "momentum_vector", None)
        if vector is None or self.inner.current_arrays is None:
            return {}
        return dict(zip(self.inner.current_arrays.keys(), vector, strict=True))

    def restore_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        """Continue with a checkpointed server momentum (keys in the order rounds aggregate)."""
        if momentum and isinstance(self.inner, FedAvgM):
            self.inner.momentum_vector = [momentum[k] for k in sorted(momentum)]

    def enough_replies(self, num_valid: int, num_sent: int) -> bool:
        """Whether a round got the configured fraction of replies."""
        return num_sent > 0 and num_valid >= self.min_reply_fraction * num_sent

    def check(
        self,
        reply: TrainReply,
        shared: list[str],
        reference: dict[str, np.ndarray],
        max_examples: int | None,
    ) -> str | None:
        """Why a decoded reply cannot be aggregated (None if it can)."""
        missing = [k for k in shared if k not in reply.params]
        if missing:
            return f"lacks shared keys {missing[:5]}"
        for key in shared:
            value = reply.params[key]
            if value.shape != reference[key].shape or value.dtype != reference[key].dtype:
                return (
                    f"'{key}' is {value.dtype}{list(value.shape)}, expected "
                    f"{reference[key].dtype}{list(reference[key].shape)}"
                )
            if not np.isfinite(value).all():
                return f"non-finite values in '{key}'"
        if reply.num_examples < 1 or (
            max_examples is not None and reply.num_examples > max_examples
        ):
            return f"num_examples {reply.num_examples} outside [1, {max_examples}]"
        if not np.isfinite(reply.loss):
            return "non-finite loss"
        return None

    def aggregate(
        self,
        server_round: int,
        replies: dict[int, tuple[Message, TrainReply]],
        shared_keys: list[str],
        reference: dict[str, np.ndarray],
        max_examples: dict[int, int] | None = None,
    ) -> Aggregate:
        """Validate each (message, decoded reply) by partition id, then aggregate the shared keys
        of the valid ones with the Flower strategy."""
        shared = sorted(shared_keys)
        accepted: list[tuple[Message, TrainReply]] = []
        rejected: dict[int, str] = {}
        for pid, (message, reply) in replies.items():
            reason = self.check(reply, shared, reference, (max_examples or {}).get(pid))
            if reason is not None:
                rejected[pid] = reason
                log(WARNING, "round %d: reply of client %d refused: %s", server_round, pid, reason)
                continue
            extra = sorted(set(reply.params) - set(shared))
            if extra:
                log(
                    WARNING,
                    "round %d: dropping %d non-shared keys from client %d (e.g. %s)",
                    server_round,
                    len(extra),
                    pid,
                    extra[0],
                )
            accepted.append((message, reply))
        if not accepted:
            return Aggregate(None, {}, rejected)
        # Flower averages a metric only if every reply reports it; an optional one (a client with
        # no labelled validation image reports no val_score) is left to whoever reads it
        fields = [numeric_fields(reply) for _, reply in accepted]
        common = set.intersection(*(set(f) for f in fields))
        valid: list[Message] = []
        for (message, reply), numbers in zip(accepted, fields, strict=True):
            message.content = RecordDict(
                {
                    PARAMS: ArrayRecord({k: Array(reply.params[k]) for k in shared}),
                    METRICS: MetricRecord({k: v for k, v in numbers.items() if k in common}),
                }
            )
            valid.append(message)
        if not shared:  # a round that averages no keys still reports its metrics
            metrics = self.inner.train_metrics_aggr_fn([m.content for m in valid], NUM_EXAMPLES)
            return Aggregate({}, {k: float(v) for k, v in metrics.items()}, rejected)
        if isinstance(self.inner, FedAvgM):  # it steps from the server's copy, whatever happened
            self.inner.current_arrays = ArrayRecord({k: Array(reference[k]) for k in shared})
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        params = {k: v.numpy() for k, v in (arrays or ArrayRecord()).items()}
        return Aggregate(params, {k: float(v) for k, v in (metrics or {}).items()}, rejected)
