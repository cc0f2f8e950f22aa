"""NMoE ClientApp: message handlers for training stages, evaluation and peer inference.

Message types: `query.info`, `train.fe_ce|fe_sc|fe_hybrid`, `train.expert`,
`train.shared_expert`, `train.local_only`, `train.gate`, `evaluate`,
`query.route|expert|combine`. Every handler validates its input before it touches
the node's state and answers an error reply (with the reason) on bad input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, wraps
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode
from omegaconf import DictConfig, OmegaConf

from nmoe.data import ClientData, federation_spec, load_client_data, ssl_augmentation
from nmoe.inference import RoutePlan, assemble, local_logits, plan_route, route_counts
from nmoe.models import build_bundle, build_expert, build_gate, load_numpy, stage1_keys, state_numpy
from nmoe.protocol import CORR_KEY, EXPERT_INITS, FE_METHOD, GATES, QUERY_MODES, SPLITS
from nmoe.routing import answer_locally, combine, familiar, random_weights
from nmoe.training import (
    accuracy,
    forward_batched,
    gate_weights,
    train_classifier,
    train_extractor,
    train_gate,
)

from .state import PersonalState

LOCAL_EVAL_METHODS = ("local_expert", "fedavg", "shared_fe_own_head")
DATA_CACHE_DIR = (
    "data-cache"  # under the node's state-dir: this device's split, kept between messages
)
PERSONAL_GROUPS = ("model/fe", "model/expert", "model/gate.fedgate", "model/gate.rollgate")

SEED_PRIME_RUN, SEED_PRIME_CLIENT, SEED_PRIME_PART = 1_000_003, 7919, 104_729

app = ClientApp()


@dataclass
class Node:
    """Everything a handler needs about this client for the current message."""

    cfg: DictConfig
    state: PersonalState
    data: ClientData
    num_classes: int

    @property
    def pid(self) -> int:
        return self.state.partition_id

    @property
    def num_partitions(self) -> int:
        return self.state.num_partitions

    @property
    def shared_expert_id(self) -> int | None:
        return self.num_partitions if self.cfg.expert.shared_expert else None

    @property
    def num_experts(self) -> int:
        return self.num_partitions + (1 if self.cfg.expert.shared_expert else 0)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.data.train_x.shape[1:])

    def seed(self, *parts: int) -> int:
        """A seed distinct per (run seed, client, purpose, round): primes keep the terms apart."""
        return (
            int(self.cfg.seed) * SEED_PRIME_RUN
            + self.pid * SEED_PRIME_CLIENT
            + sum(p * SEED_PRIME_PART ** (i + 1) for i, p in enumerate(parts))
        )

    def bundle(self, arrays: dict[str, np.ndarray] | None = None, method: str | None = None):
        """The seeded stage-1 bundle with `arrays` loaded: every key, or exactly the keys
        stage-1 `method` trains."""
        bundle = build_bundle(
            self.cfg.model, self.image_shape, self.num_classes, int(self.cfg.seed)
        )
        if arrays is not None:
            load_numpy(
                bundle, arrays, expected=None if method is None else stage1_keys(bundle, method)
            )
        return bundle

    def expert(self, group: str = "model/expert"):
        expert = build_expert(self.cfg.model, self.num_classes, self.seed())
        load_numpy(expert, self.state.get(group))
        return expert

    def extractor(self) -> torch.nn.Module:
        """The installed F, built once per call: reuse it for several batches."""
        return self.bundle(self.state.get("model/fe")).fe

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return forward_batched(self.extractor(), x)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`expert` / `gate`: the local training data divided by `expert.gate_holdout_fraction`
        (the gate learns on samples the own expert never saw); `test`, `global`: evaluation."""
        if name not in SPLITS + ("expert",):
            raise ValueError(f"unknown split '{name}', allowed: {', '.join(SPLITS)}")
        d = self.data
        if name in ("expert", "gate"):
            order = torch.randperm(
                len(d.train_y), generator=torch.Generator().manual_seed(self.seed(10))
            )
            held = int(len(order) * float(self.cfg.expert.gate_holdout_fraction))
            index = order[held:] if name == "expert" or held == 0 else order[:held]
            return d.train_x[index], d.train_y[index]
        return {
            "train": (d.train_x, d.train_y),
            "test": (d.test_x, d.test_y),
            "global": (d.global_x, d.global_y),
        }[name]


@lru_cache(maxsize=4)
def parsed_config(config_json: str) -> DictConfig:
    """The run config of a JSON string, parsed once per process (read-only: handlers share it)."""
    cfg = OmegaConf.create(json.loads(config_json))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def open_node(msg: Message, context: Context) -> Node:
    """Read the run config (from the message, else the stored one) and this client's data."""
    config_json = None
    if "config" in msg.content.config_records and "nmoe" in msg.content["config"]:
        config_json = str(msg.content["config"]["nmoe"])
    state = PersonalState(context, config_json)
    cfg = parsed_config(state.config_json())
    if int(cfg.torch_threads) > 0:
        torch.set_num_threads(int(cfg.torch_threads))
    spec = federation_spec(cfg)
    cache = state.state_dir / DATA_CACHE_DIR if state.state_dir is not None else None
    data, classes = load_client_data(spec, state.partition_id, state.num_partitions, cache)
    return Node(cfg, state, data, classes)


def guarded(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Turn any exception into an error reply that names the reason; the node keeps serving."""

    @wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            log(WARNING, "%s rejected: %s", msg.metadata.message_type, reason)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )

    return wrapper


def config_value(msg: Message, key: str) -> Any:
    """A required value of the message's ConfigRecord."""
    if "config" not in msg.content.config_records or key not in msg.content["config"]:
        raise KeyError(f"message lacks config key '{key}'")
    return msg.content["config"][key]


def received_arrays(msg: Message, record: str = "arrays") -> dict[str, np.ndarray]:
    if record not in msg.content.array_records:
        raise KeyError(f"message lacks array record '{record}'")
    return {k: v.numpy() for k, v in msg.content[record].items()}


def reply(
    msg: Message,
    metrics: dict[str, Any],
    arrays: dict[str, Any] | None = None,
    **records: ArrayRecord,
) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    for name, record in records.items():
        content[name] = record
    return Message(content, reply_to=msg)


def check_features(value: np.ndarray, feature_dim: int, max_rows: int, name: str) -> torch.Tensor:
    """Validate a feature batch received from a peer."""
    if value.dtype != np.float32:
        raise ValueError(f"{name}: dtype {value.dtype}, expected float32")
    if value.ndim != 2 or value.shape[1] != feature_dim:
        raise ValueError(f"{name}: shape {value.shape}, expected (n, {feature_dim})")
    if value.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if value.shape[0] > max_rows:
        raise ValueError(f"{name}: {value.shape[0]} rows exceed max_query_batch={max_rows}")
    if not np.isfinite(value).all():
        raise ValueError(f"{name}: non-finite values (NaN/Inf)")
    return torch.from_numpy(np.array(value))


# ---------------------------------------------------------------------------- info
@app.query("info")
@guarded
def info(msg: Message, context: Context) -> Message:
    node = open_node(msg, context)
    return reply(
        msg,
        {
            "partition-id": node.pid,
            "num-partitions": node.num_partitions,
            "num-train": len(node.data.train_y),
            "num-test": len(node.data.test_y),
            "label-counts": [int((node.data.train_y == c).sum()) for c in range(node.num_classes)],
            **{f"has:{name}": int(node.state.has(name)) for name in PERSONAL_GROUPS},
        },
    )


# ---------------------------------------------------------------------------- stage 1
def train_fe(msg: Message, context: Context) -> Message:
    """Stage 1: one local update of the parts the method trains (F + head, F + projector, or all)."""
    action = msg.metadata.message_type.split(".", 1)[1]
    method = FE_METHOD[action]
    node = open_node(msg, context)
    bundle = node.bundle(received_arrays(msg), method)
    others_corr, others_weight = None, 0.0
    if "peer" in msg.content.array_records:
        others_corr = torch.from_numpy(received_arrays(msg, "peer")["corr"])
        others_weight = (node.num_partitions - 1) / node.num_partitions
    fe_cfg = node.cfg.fe
    server_round = int(config_value(msg, "server-round"))
    result = train_extractor(
        bundle,
        node.data.train_x,
        node.data.train_y,
        method=method,
        epochs=int(fe_cfg.local_epochs),
        lr=float(fe_cfg.lr),
        momentum=float(fe_cfg.momentum),
        batch_size=int(fe_cfg.batch_size),
        seed=node.seed(1, server_round),
        ssl_weight=float(fe_cfg.ssl_weight),
        embedding_clip=float(fe_cfg.embedding_clip),
        augment=ssl_augmentation(node.image_shape) if method != "fedce" else None,
        others_corr=others_corr,
        others_weight=others_weight,
    )
    trained = stage1_keys(bundle, method)
    arrays = {k: v for k, v in state_numpy(bundle).items() if k in trained}
    if fe_cfg.share_correlation and result.correlation is not None:
        generator = torch.Generator().manual_seed(node.seed(2, server_round))
        noise = torch.randn(result.correlation.shape, generator=generator) * float(
            fe_cfg.correlation_noise
        )
        arrays[CORR_KEY] = (result.correlation + (noise + noise.T) / 2).numpy()
    metrics: dict[str, Any] = {
        "num-examples": len(node.data.train_y),
        "loss": result.loss,
        "ce-loss": result.ce_loss,
        "ssl-loss": result.ssl_loss,
    }
    if method != "fedsc":
        metrics["test-acc"] = accuracy(
            forward_batched(lambda x: bundle.head(bundle.fe(x)), node.data.test_x), node.data.test_y
        )
    return reply(msg, metrics, arrays)


for _action in FE_METHOD:
    app.train(_action)(guarded(train_fe))


# ---------------------------------------------------------------------------- stage 2
@app.train("expert")
@guarded
def train_expert(msg: Message, context: Context) -> Message:
    """Stage 2: install the final F (if sent), train the personal expert on its features (F frozen),
    starting as `expert-init` says (scratch, the installed shared expert, or none: skip)."""
    node = open_node(msg, context)
    own_head = bool(config_value(msg, "own-head"))
    init = str(msg.content["config"].get("expert-init", "scratch"))
    if init not in EXPERT_INITS:
        raise ValueError(f"unknown expert-init '{init}', allowed: {', '.join(EXPERT_INITS)}")
    fe_arrays = (
        received_arrays(msg)
        if "arrays" in msg.content.array_records
        else node.state.get("model/fe")
    )
    bundle = node.bundle(fe_arrays)
    initial = node.expert("model/shared_expert") if init == "shared" else None
    node.state.put("model/fe", fe_arrays)
    metrics: dict[str, Any] = {"num-examples": 0}
    ex = node.cfg.expert
    if init != "none":
        x, y = node.split("expert")
        expert = (
            initial
            if initial is not None
            else build_expert(node.cfg.model, node.num_classes, node.seed())
        )
        metrics["loss"] = train_classifier(
            expert,
            forward_batched(bundle.fe, x),
            y,
            epochs=int(ex.epochs),
            lr=float(ex.lr),
            batch_size=int(ex.batch_size),
            seed=node.seed(3),
        )
        node.state.put("model/expert", state_numpy(expert))
        metrics["num-examples"] = len(y)
        metrics["test-acc"] = accuracy(
            forward_batched(expert, forward_batched(bundle.fe, node.data.test_x)), node.data.test_y
        )
    if own_head:  # FedPer/FedRep-style baseline: the global head, fine-tuned locally
        head = bundle.head
        all_feats = forward_batched(bundle.fe, node.data.train_x)
        train_classifier(
            head,
            all_feats,
            node.data.train_y,
            epochs=int(ex.epochs),
            lr=float(ex.lr),
            batch_size=int(ex.batch_size),
            seed=node.seed(4),
        )
        node.state.put("model/own_head", state_numpy(head))
    node.state.persist()
    return reply(msg, metrics)


@app.train("shared_expert")
@guarded
def train_shared_expert(msg: Message, context: Context) -> Message:
    """Stage 2 option: one FedAvg round of the shared expert H_0 (or install the final H_0)."""
    node = open_node(msg, context)
    expert = build_expert(node.cfg.model, node.num_classes, int(node.cfg.seed))
    load_numpy(expert, received_arrays(msg))
    if bool(config_value(msg, "install")):
        node.state.put("model/shared_expert", state_numpy(expert))
        node.state.persist()
        return reply(msg, {"num-examples": len(node.data.train_y)})
    ex = node.cfg.expert
    feats = node.features(node.data.train_x)
    loss = train_classifier(
        expert,
        feats,
        node.data.train_y,
        epochs=int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(5, int(config_value(msg, "server-round"))),
    )
    return reply(msg, {"num-examples": len(node.data.train_y), "loss": loss}, state_numpy(expert))


@app.train("local_only")
@guarded
def train_local_only(msg: Message, context: Context) -> Message:
    """Baseline: F + head and an expert trained on this client's data alone; returns accuracies only."""
    node = open_node(msg, context)
    fe_cfg, ex = node.cfg.fe, node.cfg.expert
    bundle = node.bundle()
    train_extractor(
        bundle,
        node.data.train_x,
        node.data.train_y,
        method="fedce",
        epochs=int(fe_cfg.rounds) * int(fe_cfg.local_epochs),
        lr=float(fe_cfg.lr),
        momentum=float(fe_cfg.momentum),
        batch_size=int(fe_cfg.batch_size),
        seed=node.seed(6),
    )
    expert = build_expert(node.cfg.model, node.num_classes, node.seed())
    train_classifier(
        expert,
        forward_batched(bundle.fe, node.data.train_x),
        node.data.train_y,
        epochs=int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(7),
    )
    model = lambda x: expert(bundle.fe(x))
    return reply(
        msg,
        {
            "num-examples": len(node.data.train_y),
            "acc-local": accuracy(forward_batched(model, node.data.test_x), node.data.test_y),
            "acc-global": accuracy(forward_batched(model, node.data.global_x), node.data.global_y),
        },
    )


# ---------------------------------------------------------------------------- stage 3
@app.train("gate")
@guarded
def train_gate_handler(msg: Message, context: Context) -> Message:
    """Stage 3: overwrite the received gate keys, then (unless `install`) train on the cache.

    Replies with the keys named in `return-keys` (the shared part for FedGate,
    the whole gate for RollGate).
    """
    node = open_node(msg, context)
    name = str(config_value(msg, "gate"))
    if name not in ("rollgate", "fedgate"):
        raise ValueError(f"gate '{name}' is not trainable; allowed: rollgate, fedgate")
    group = f"model/gate.{name}"
    gate = build_gate(node.cfg.model, node.num_experts, int(node.cfg.seed))
    if node.state.has(group):
        load_numpy(gate, node.state.get(group))
    load_numpy(gate, received_arrays(msg), strict=False)
    metrics: dict[str, Any] = {"num-examples": len(node.split("gate")[1])}
    if not bool(config_value(msg, "install")):
        cache = node.state.get("scratch/cache")
        logits, answered = (
            torch.from_numpy(cache["logits"]),
            torch.from_numpy(cache["answered"]) > 0,
        )
        x, y = node.split("gate")
        gc = node.cfg.gate
        metrics["loss"] = train_gate(
            gate,
            node.features(x),
            y,
            logits,
            answered.all(dim=0),
            k=int(gc.k),
            noise_std=float(gc.noise_std),
            epochs=int(gc.local_epochs),
            lr=float(gc.lr),
            batch_size=int(gc.batch_size),
            seed=node.seed(8, int(config_value(msg, "server-round"))),
        )
    own = state_numpy(gate)
    node.state.put(group, own)
    node.state.persist()
    keys = [k for k in str(config_value(msg, "return-keys")).split(",") if k]
    unknown = [k for k in keys if k not in own]
    if unknown:
        raise KeyError(f"return-keys not in the gate: {unknown}")
    return reply(msg, metrics, {k: own[k] for k in keys})


# ---------------------------------------------------------------------------- evaluation
@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracies of the methods answered without routing, on local test and global test."""
    node = open_node(msg, context)
    methods = [m for m in str(config_value(msg, "methods")).split(",") if m]
    bundle = node.bundle(node.state.get("model/fe"))
    metrics: dict[str, Any] = {"num-examples": len(node.data.test_y)}
    for method in methods:
        if method == "local_expert":
            expert = node.expert()
            model = lambda x, e=expert: e(bundle.fe(x))
        elif (
            method == "fedavg"
        ):  # the stage-1 model, or a separately trained FedCE model (with FedSC)
            fedavg = (
                node.bundle(received_arrays(msg, "fedavg"))
                if "fedavg" in msg.content.array_records
                else bundle
            )
            model = lambda x, b=fedavg: b.head(b.fe(x))
        elif method == "shared_fe_own_head":
            head = node.bundle().head
            load_numpy(head, node.state.get("model/own_head"))
            model = lambda x, h=head: h(bundle.fe(x))
        else:
            raise ValueError(
                f"unknown local method '{method}', allowed: {', '.join(LOCAL_EVAL_METHODS)}"
            )
        metrics[f"acc-local.{method}"] = accuracy(
            forward_batched(model, node.data.test_x), node.data.test_y
        )
        metrics[f"acc-global.{method}"] = accuracy(
            forward_batched(model, node.data.global_x), node.data.global_y
        )
    return reply(msg, metrics)


# ---------------------------------------------------------------------------- peer inference
def _reachable(node: Node, neighbours: str) -> torch.Tensor:
    ids = [int(v) for v in neighbours.split(",") if v != ""]
    if node.pid not in ids:
        raise ValueError(f"neighbours {ids} must include the requester itself ({node.pid})")
    if any(not 0 <= i < node.num_partitions for i in ids):
        raise ValueError(f"neighbour ids {ids} outside [0, {node.num_partitions})")
    mask = torch.zeros(node.num_experts, dtype=torch.bool)
    mask[ids] = True
    if node.shared_expert_id is not None:
        mask[node.shared_expert_id] = True
    return mask


def query_splits(node: Node, value: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The splits one query coalesces (comma list, repeats allowed), concatenated, and their sizes."""
    names = [name for name in value.split(",") if name]
    if not names:
        raise ValueError("no split named in 'split'")
    if mode == "cache" and len(names) != 1:
        raise ValueError(f"mode 'cache' takes exactly one split, got {names}")
    parts = [node.split(name) for name in names]
    return (
        torch.cat([x for x, _ in parts]),
        torch.cat([y for _, y in parts]),
        [len(y) for _, y in parts],
    )


@app.query("route")
@guarded
def route(msg: Message, context: Context) -> Message:
    """Wave 1: compute features and routing weights for every split the query names (one
    concatenated batch); return one feature batch per remote expert."""
    node = open_node(msg, context)
    qid = str(config_value(msg, "query-id"))
    mode, gate_name = (str(config_value(msg, k)) for k in ("mode", "gate"))
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown mode '{mode}', allowed: {', '.join(QUERY_MODES)}")
    k = int(config_value(msg, "k"))
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    x, y, segments = query_splits(node, str(config_value(msg, "split")), mode)
    reachable = _reachable(node, str(config_value(msg, "neighbours")))
    fe = node.extractor()
    feats = forward_batched(fe, x)
    generator = torch.Generator().manual_seed(node.seed(9, int(config_value(msg, "seed"))))
    if mode == "cache":
        weights = reachable.float().expand(len(x), -1).clone()
    elif gate_name == "rangate":
        weights = random_weights(len(x), reachable, k, generator)
    elif gate_name in GATES:
        gate = build_gate(node.cfg.model, node.num_experts, int(node.cfg.seed))
        load_numpy(gate, node.state.get(f"model/gate.{gate_name}"))
        weights = gate_weights(gate, feats, reachable, k)
    else:
        raise ValueError(f"unknown gate '{gate_name}', allowed: {', '.join(GATES)}")
    local = {node.pid: node.expert()}
    if node.shared_expert_id is not None:
        local[node.shared_expert_id] = node.expert("model/shared_expert")
    logits = local_logits(feats, local)
    quantile = float(node.cfg.gate.local_first_quantile)
    if mode == "infer" and quantile > 0:
        weights = answer_locally(
            weights, node.pid, familiar(feats, forward_batched(fe, node.data.train_x), quantile)
        )
    plan = plan_route(weights, logits)
    pending = {"weights": plan.weights, "labels": y, "segments": np.array(segments)}
    pending.update({f"local_{e}": v for e, v in plan.local_logits.items()})
    pending.update({f"idx_{e}": v for e, v in plan.remote_index.items()})
    node.state.put(f"scratch/pending.{qid}", pending)
    noise_std = float(node.cfg.feature_noise_std)
    outgoing = ArrayRecord()
    for e, index in plan.remote_index.items():
        sent = feats[index]
        if noise_std > 0:
            sent = sent + torch.randn(sent.shape, generator=generator) * noise_std
        outgoing[f"to_{e}"] = Array(sent.numpy())
    return reply(
        msg, {"num-examples": len(y), "num-remote": len(plan.remote_index)}, features=outgoing
    )


@app.query("expert")
@guarded
def expert_answer(msg: Message, context: Context) -> Message:
    """Wave 2: run this node's personal expert on every feature batch addressed to it."""
    node = open_node(msg, context)
    batches = received_arrays(msg, "features")
    if not batches:
        raise ValueError("no feature batches in the message")
    expert = node.expert()
    dim, limit = int(node.cfg.model.feature_dim), int(node.cfg.max_query_batch)
    checked = {key: check_features(value, dim, limit, key) for key, value in batches.items()}
    logits = ArrayRecord(
        {key: Array(forward_batched(expert, feats).numpy()) for key, feats in checked.items()}
    )
    return reply(msg, {"num-examples": sum(len(v) for v in checked.values())}, logits=logits)


@app.query("combine")
@guarded
def combine_answer(msg: Message, context: Context) -> Message:
    """Wave 3: combine local and returned logits (renormalising over failed experts), or cache them.
    Metrics come per split of the query, in its order: `accuracy.<i>`, `num-examples.<i>` ..."""
    node = open_node(msg, context)
    qid, mode = str(config_value(msg, "query-id")), str(config_value(msg, "mode"))
    pending = node.state.get(f"scratch/pending.{qid}")
    weights = torch.from_numpy(pending["weights"])
    plan = RoutePlan(
        weights,
        {int(k[6:]): torch.from_numpy(v) for k, v in pending.items() if k.startswith("local_")},
        {int(k[4:]): torch.from_numpy(v) for k, v in pending.items() if k.startswith("idx_")},
    )
    returned = received_arrays(msg, "logits") if "logits" in msg.content.array_records else {}
    remote = {}
    for key, value in returned.items():
        if not key.startswith("exp_"):
            raise ValueError(f"unexpected logits key '{key}'")
        if not np.isfinite(value).all():
            raise ValueError(f"{key}: non-finite logits")
        remote[int(key[4:])] = torch.from_numpy(np.array(value, dtype=np.float32))
    logits, answered = assemble(plan, remote, node.num_classes)
    node.state.drop(f"scratch/pending.{qid}")
    labels = torch.from_numpy(pending["labels"])
    if mode == "cache":
        node.state.put("scratch/cache", {"logits": logits, "answered": answered.float()})
        return reply(
            msg, {"num-examples": len(labels), "experts-cached": int(answered.all(dim=0).sum())}
        )
    combined, degraded = combine(weights, logits, answered, fallback=node.pid)
    predictions = combined.argmax(dim=1)
    with_predictions = bool(config_value(msg, "return-predictions"))
    metrics: dict[str, Any] = {"num-examples": len(labels), "segments": len(pending["segments"])}
    held_elsewhere = torch.ones(weights.shape[1], dtype=torch.bool)
    held_elsewhere[list(plan.local_logits)] = False
    no_network = ~(weights[:, held_elsewhere] > 0).any(
        dim=1
    )  # every chosen expert was held locally
    start = 0
    for i, size in enumerate(int(v) for v in pending["segments"]):
        part = slice(start, start + size)
        start += size
        metrics[f"num-examples.{i}"] = size
        metrics[f"accuracy.{i}"] = accuracy(combined[part], labels[part])
        metrics[f"degraded.{i}"] = int(degraded[part].sum())
        metrics[f"answered-locally.{i}"] = int(no_network[part].sum())
        metrics[f"route-counts.{i}"] = route_counts(weights[part])
        if with_predictions:
            metrics[f"predictions.{i}"] = [int(p) for p in predictions[part]]
    return reply(msg, metrics)
