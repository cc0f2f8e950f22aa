"""NMoEStrategy: FedAvg over the shared keys only, one message type per stage."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from .comm import CommLedger

NUM_EXAMPLES = "num-examples"
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"


class NMoEStrategy(FedAvg):
    """FedAvg that only ever averages (and keeps) the keys a stage declares shared.

    Everything personal (experts, personal gate parts, correlation statistics)
    is dropped before aggregation, so no such value is ever held by the server's
    model state. `ledger` keeps the bytes sent and received per stage.
    """

    def __init__(self, ledger: CommLedger, min_reply_fraction: float = 1.0) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.ledger = ledger
        self.min_reply_fraction = min_reply_fraction

    def configure_stage(
        self,
        stage: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: list[int],
        per_node_arrays: dict[int, ArrayRecord] | None = None,
    ) -> list[Message]:
        """One `train.<stage>` message per node carrying the shared arrays and the config."""
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        messages = []
        for node_id in node_ids:
            content = RecordDict({ARRAYS: arrays, CONFIG: config})
            if per_node_arrays and node_id in per_node_arrays:
                content["peer"] = per_node_arrays[node_id]
            messages.append(
                Message(content=content, dst_node_id=node_id, message_type=f"train.{stage}")
            )
        return messages

    def enough_replies(self, num_valid: int, num_sent: int) -> bool:
        """Whether a round got the configured fraction of replies."""
        return num_sent > 0 and num_valid >= self.min_reply_fraction * num_sent

    def aggregate_shared(
        self, server_round: int, replies: Iterable[Message], shared_keys: Iterable[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted (by num-examples) mean of exactly `shared_keys` over the valid replies."""
        shared = sorted(shared_keys)
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if not valid:
            return None, None
        filtered: list[RecordDict] = []
        for reply in valid:
            received = (
                reply.content[ARRAYS] if ARRAYS in reply.content.array_records else ArrayRecord()
            )
            missing = [k for k in shared if k not in received]
            if missing:
                raise ValueError(
                    f"reply from node {reply.metadata.src_node_id} lacks shared keys {missing[:5]}"
                )
            extra = [k for k in received if k not in shared]
            if extra:
                log(
                    WARNING,
                    "Dropping %d non-shared keys from node %d (e.g. %s)",
                    len(extra),
                    reply.metadata.src_node_id,
                    extra[0],
                )
            metrics = reply.content[METRICS]
            filtered.append(
                RecordDict(
                    {
                        ARRAYS: ArrayRecord({k: received[k] for k in shared}),
                        METRICS: MetricRecord({NUM_EXAMPLES: metrics[NUM_EXAMPLES]}),
                    }
                )
            )
        arrays = aggregate_arrayrecords(filtered, NUM_EXAMPLES) if shared else ArrayRecord()
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], NUM_EXAMPLES)
        return arrays, metrics
