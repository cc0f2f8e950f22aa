"""The wire contract: every message the ServerApp and the ClientApp exchange, in one file.

Flower message types are `train.<action>`, `evaluate` or `query.<action>`. Each request below
names its type in `TYPE`; its reply is the class beside it. Non-array fields travel in one
`ConfigRecord` "config" (or `MetricRecord` "metrics" for training replies, which a Flower
strategy aggregates), array maps in `ArrayRecord`s named after the field (see `codec`).

Run set-up (once per node and run)
  query.setup        SetupRequest(config_json)                 -> NodeInfo, or an error reply
                                                                  with code SETUP_REFUSED
Stage 1, the shared extractor F
  train.correlation  CorrelationRequest(round, params)         -> CorrelationReply(correlation)
                       (FedSC with shared correlations: the fresh global model's, before training)
  train.extractor    ExtractorRequest(method, round, params,   -> ExtractorReply(params, metrics)
                       alpha, others_correlation?)
Installing a shared part the server holds (F, H_0, a gate's shared keys, the FedAvg model)
  train.install      InstallRequest(part, params, gate?)       -> Installed
Stage 2, experts
  train.shared_expert SharedExpertRequest(round, params)       -> TrainReply(params, metrics)
  train.expert       ExpertRequest(init)                       -> ExpertReply
Stage 3, gates (whatever the gate's module declares shared travels)
  train.gate         GateRequest(gate, round, params)          -> TrainReply(params, metrics)
Baselines trained on the clients
  train.own_head     OwnHeadRequest()                          -> ExpertReply
  train.local_only   LocalOnlyRequest()                        -> Accuracies
Evaluation without routing
  evaluate           EvaluateRequest(methods)                  -> Accuracies
Peer inference, relayed by the server in three waves (see nmoe_strategy/router.py)
  query.route        RouteRequest(query, splits, mode, gate,   -> RouteReply(features by expert id)
                       neighbours, seed)
  query.expert       ExpertQuery(query, batches by requester)  -> ExpertAnswer(logits by requester)
  query.combine      CombineRequest(query, logits by expert,   -> CombineReply (per split)
                       return_predictions)
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional

from .codec import METRICS, Arrays, ArraysById, ProtocolError, WireMessage

# Message types
SETUP = "query.setup"
TRAIN_EXTRACTOR = "train.extractor"
TRAIN_CORRELATION = "train.correlation"
INSTALL = "train.install"
TRAIN_SHARED_EXPERT = "train.shared_expert"
TRAIN_EXPERT = "train.expert"
TRAIN_GATE = "train.gate"
TRAIN_OWN_HEAD = "train.own_head"
TRAIN_LOCAL_ONLY = "train.local_only"
EVALUATE = "evaluate"
ROUTE = "query.route"
EXPERT = "query.expert"
COMBINE = "query.combine"

# Values some fields may take
INSTALL_PARTS = ("fe", "shared_expert", "gate", "fedavg", "peer_keys")
EXPERT_INITS = ("scratch", "shared")
SCHEDULES = ("fe", "fedavg")
# infer: answer the named splits; cache: every reachable expert (gate training); oracle: every
# reachable expert, the best per true label (a measurement); serve: the node's inbox
QUERY_MODES = ("infer", "cache", "oracle", "serve")
GATED_MODES = ("infer", "serve")  # the gate routes (and local-first applies)

# A node that refuses the run's set-up (its owner's policy, its data, a config it cannot read)
# answers with an error reply of this code (outside Flower's own `ErrorCode`s): the server
# leaves it out of the run at once instead of asking again. Its reason starts with
# `setup refused by partition <id> of <n>: ` (when the node knows them).
SETUP_REFUSED = 1701
_REFUSAL = re.compile(r"^setup refused by partition (\d+) of (\d+): ")
SPLITS = ("train", "gate", "test", "global", "inbox")
LOCAL_EVAL_METHODS = (
    "local_expert",
    "local_head",
    "own_model",
    "fedavg",
    "fedavg_task_prior",
    "shared_fe_own_head",
)

# Personal state groups a node reports holding (`NodeInfo.holds`): a resumed run skips a
# client-side stage whose result every node still holds.
FE_STATE, EXPERT_STATE, LOCAL_HEAD_STATE = "model/fe", "model/expert", "model/local_head"


def gate_state(gate: str) -> str:
    """The personal state group of a gate's parameters."""
    return f"model/gate.{gate}"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)


def _one_of(value: str, name: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"unknown {name} '{value}', allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------- run set-up
@dataclasses.dataclass(frozen=True)
class SetupRequest(WireMessage):
    """The run's resolved config (JSON), sent once per node and run; the node keeps it."""

    TYPE: ClassVar[str] = SETUP
    config_json: str


def setup_refusal(partition_id: int | None, num_partitions: int | None, reason: str) -> str:
    """The reason of a `SETUP_REFUSED` error reply."""
    if partition_id is None or num_partitions is None:
        return f"setup refused: {reason}"
    return f"setup refused by partition {partition_id} of {num_partitions}: {reason}"


def parse_setup_refusal(reason: str) -> tuple[int | None, int | None]:
    """(partition id, number of partitions) a `SETUP_REFUSED` reason names, else (None, None)."""
    found = _REFUSAL.match(reason)
    return (int(found[1]), int(found[2])) if found else (None, None)


@dataclasses.dataclass(frozen=True)
class NodeInfo(WireMessage):
    """What a node reports about itself at set-up (no samples, only counts)."""

    partition_id: int
    num_partitions: int
    num_train: int
    num_labelled: int
    num_test: int
    num_global: int  # 0: the node holds no global test set
    label_counts: list[int]  # of the labelled training images
    image_shape: list[int]
    num_classes: int
    holds: list[str]  # personal state groups this node holds for the run's state key
    public_key: bytes  # X25519, for payloads sealed to this node (pinned by its peers)
    data_source: str  # "partition" of the configured dataset (simulation) or its own "data-dir"

    def check(self) -> None:
        _require(
            0 <= self.partition_id < self.num_partitions, "partition_id outside the federation"
        )


# ---------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class CorrelationRequest(WireMessage):
    """FedSC with shared correlations, before round `server_round`'s training: the client's
    correlation matrix of the fresh global F + projector `params` (eval mode, augmented views of
    its images, its own noise added)."""

    TYPE: ClassVar[str] = TRAIN_CORRELATION
    server_round: int
    params: Arrays

    def check(self) -> None:
        _require(self.server_round >= 1, f"server_round must be >= 1, got {self.server_round}")


@dataclasses.dataclass(frozen=True)
class CorrelationReply(WireMessage):
    correlation: Arrays  # {"corr": (d, d)}
    num_examples: int


@dataclasses.dataclass(frozen=True)
class ExtractorRequest(WireMessage):
    """Stage 1: one local update of the parts `method` trains, starting from `params`, with the
    run config's `schedule` (`fe`: stage 1's; `fedavg`: the FedAvg baseline's own FedCE run).
    FedSC with shared correlations: `others_correlation` is C_ext (the other clients' average
    correlation of `params`) and `alpha` the weight of the local repulsion."""

    TYPE: ClassVar[str] = TRAIN_EXTRACTOR
    method: str
    server_round: int
    params: Arrays
    schedule: str = "fe"
    others_correlation: Optional[Arrays] = None  # FedSC: C_ext
    alpha: float = 1.0

    def check(self) -> None:
        _require(self.server_round >= 1, f"server_round must be >= 1, got {self.server_round}")
        _one_of(self.schedule, "schedule", SCHEDULES)
        _require(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class TrainReply(WireMessage):
    """The parameters a client trained (only the shared keys) and its training metrics."""

    SCALARS: ClassVar[str] = METRICS
    params: Arrays
    num_examples: int
    loss: float
    # with fe.patience: the score on the held-out validation part (-CE loss; FedSC: -SSL loss)
    val_score: Optional[float] = None

    def check(self) -> None:
        _require(self.num_examples >= 0, "num_examples must be >= 0")


@dataclasses.dataclass(frozen=True)
class ExtractorReply(TrainReply):
    ce_loss: float = 0.0
    ssl_loss: float = 0.0
    test_acc: Optional[float] = None  # F + head on the local test split (methods with a head)


@dataclasses.dataclass(frozen=True)
class InstallRequest(WireMessage):
    """Install a shared part the server holds: F (`fe`), the shared expert, a gate's shared
    keys (`gate` names the gate), the separately trained FedAvg model (`fedavg`), or the peers'
    public keys (`peer_keys`: partition id -> 32 bytes, pinned for the run)."""

    TYPE: ClassVar[str] = INSTALL
    part: str
    params: Arrays
    gate: Optional[str] = None

    def check(self) -> None:
        _one_of(self.part, "part", INSTALL_PARTS)
        _require(
            (self.gate is not None) == (self.part == "gate"), "'gate' names the gate of part 'gate'"
        )


@dataclasses.dataclass(frozen=True)
class Installed(WireMessage):
    keys: int


@dataclasses.dataclass(frozen=True)
class SharedExpertRequest(WireMessage):
    """Stage 2 option: one FedAvg round of the shared expert H_0."""

    TYPE: ClassVar[str] = TRAIN_SHARED_EXPERT
    server_round: int
    params: Arrays


@dataclasses.dataclass(frozen=True)
class ExpertRequest(WireMessage):
    """Stage 2: train the personal expert on the installed F, from scratch or from H_0."""

    TYPE: ClassVar[str] = TRAIN_EXPERT
    init: str

    def check(self) -> None:
        _one_of(self.init, "expert init", EXPERT_INITS)


@dataclasses.dataclass(frozen=True)
class ExpertReply(WireMessage):
    SCALARS: ClassVar[str] = METRICS
    num_examples: int
    loss: float
    test_acc: float


@dataclasses.dataclass(frozen=True)
class GateRequest(WireMessage):
    """Stage 3: overwrite the gate's keys in `params`, train it locally, return its shared keys."""

    TYPE: ClassVar[str] = TRAIN_GATE
    gate: str
    server_round: int
    params: Arrays


@dataclasses.dataclass(frozen=True)
class OwnHeadRequest(WireMessage):
    """Baseline `shared_fe_own_head`: fine-tune the installed global head on local data."""

    TYPE: ClassVar[str] = TRAIN_OWN_HEAD


@dataclasses.dataclass(frozen=True)
class LocalOnlyRequest(WireMessage):
    """Baseline `local_only`: F + expert trained on this client's data alone."""

    TYPE: ClassVar[str] = TRAIN_LOCAL_ONLY


@dataclasses.dataclass(frozen=True)
class EvaluateRequest(WireMessage):
    """Accuracies of methods answered without routing."""

    TYPE: ClassVar[str] = EVALUATE
    methods: list[str]

    def check(self) -> None:
        for method in self.methods:
            _one_of(method, "local method", LOCAL_EVAL_METHODS)


@dataclasses.dataclass(frozen=True)
class Accuracies(WireMessage):
    """Per method (in order): accuracy on the local test split and on the global test set
    (`acc_global` is empty when the node holds no global test set)."""

    SCALARS: ClassVar[str] = METRICS
    num_examples: int
    acc_local: list[float]
    acc_global: list[float]
    epochs_run: Optional[int] = None  # local_only: epochs its early-stopping rule ran


# ---------------------------------------------------------------------------- peer inference
@dataclasses.dataclass(frozen=True)
class RouteRequest(WireMessage):
    """Wave 1: route every sample of the named splits (coalesced, in order) through `gate`;
    `mode=cache` asks every reachable expert (to train gates on their outputs)."""

    TYPE: ClassVar[str] = ROUTE
    query_id: str
    splits: list[str]
    mode: str
    gate: str
    neighbours: list[int]
    seed: int = 0

    def check(self) -> None:
        _one_of(self.mode, "mode", QUERY_MODES)
        _require(bool(self.splits), "no split named in 'splits'")
        for split in self.splits:
            _one_of(split, "split", SPLITS)
        _require(
            (self.mode == "serve") == (self.splits == ["inbox"]),
            "mode 'serve' routes the inbox and only it",
        )
        _require(
            self.mode != "cache" or len(self.splits) == 1,
            f"mode 'cache' takes exactly one split, got {self.splits}",
        )
        _require(bool(self.query_id), "empty query_id")


@dataclasses.dataclass(frozen=True)
class RouteReply(WireMessage):
    """One feature batch per remote expert id the requester chose."""

    features: ArraysById
    num_examples: int


@dataclasses.dataclass(frozen=True)
class ExpertQuery(WireMessage):
    """Wave 2: every feature batch addressed to this node's expert, keyed by requester id."""

    TYPE: ClassVar[str] = EXPERT
    query_id: str
    batches: ArraysById
    with_familiarity: bool = False  # also return each row's familiarity ratio (KnowGate)

    def check(self) -> None:
        _require(bool(self.batches), "no feature batches in the message")


@dataclasses.dataclass(frozen=True)
class ExpertAnswer(WireMessage):
    logits: ArraysById
    num_examples: int
    familiarity: Optional[ArraysById] = None  # per requester: (n,) ratios, <= 1 familiar


@dataclasses.dataclass(frozen=True)
class CombineRequest(WireMessage):
    """Wave 3: the logits each remote expert returned (an expert missing here failed)."""

    TYPE: ClassVar[str] = COMBINE
    query_id: str
    logits: ArraysById
    return_predictions: bool = False
    familiarity: Optional[ArraysById] = None  # per expert id: its ratios for the rows it got


@dataclasses.dataclass(frozen=True)
class CombineReply(WireMessage):
    """Per split of the query, in its order. `route_counts` is flattened: split i's counts of
    samples routed to each expert id are `route_counts[i * num_experts:(i + 1) * num_experts]`;
    `predictions` (if asked) concatenates the splits' predictions."""

    SCALARS: ClassVar[str] = METRICS
    num_examples: list[int]
    accuracy: list[float]
    degraded: list[int]
    answered_locally: list[int]
    route_counts: list[int]
    num_experts: int
    predictions: Optional[list[int]] = None
    experts_cached: Optional[int] = None  # mode=cache: experts whose outputs were cached

    def route_counts_of(self, split: int) -> list[int]:
        return self.route_counts[split * self.num_experts : (split + 1) * self.num_experts]

    def predictions_of(self, split: int) -> list[int]:
        if self.predictions is None:
            raise ProtocolError("no predictions in this reply")
        start = sum(self.num_examples[:split])
        return self.predictions[start : start + self.num_examples[split]]


REQUESTS: dict[str, type[WireMessage]] = {
    cls.TYPE: cls
    for cls in (
        SetupRequest,
        CorrelationRequest,
        ExtractorRequest,
        InstallRequest,
        SharedExpertRequest,
        ExpertRequest,
        GateRequest,
        OwnHeadRequest,
        LocalOnlyRequest,
        EvaluateRequest,
        RouteRequest,
        ExpertQuery,
        CombineRequest,
    )
}
