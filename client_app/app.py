"""NMoE ClientApp: one handler per message type of the wire contract (nmoe_protocol.messages).

Each handler decodes its request (`ProtocolError` on anything off-contract), opens the node,
calls the torch core, and encodes the reply. Any exception becomes an error reply naming the
reason; the node keeps serving, and a request that fails changes nothing persisted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial, wraps
from logging import WARNING
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode

from nmoe import gates
from nmoe.config import FEDAVG_MODEL_BASELINES
from nmoe.gates import GateData
from nmoe.losses import label_log_prior
from nmoe.models import build_expert, load_numpy, stage1_keys, state_numpy
from nmoe.pipeline import (
    PendingQuery,
    answer,
    assemble,
    finish_query,
    outgoing_features,
    plan_query,
)
from nmoe.routing import move_to_task_prior, own_label_prior
from nmoe.ssl import client_correlation, round_lr
from nmoe.training import (
    accuracy,
    forward_batched,
    stage1_validation_loss,
    train_classifier,
    train_extractor,
    train_supervised_until_converged,
    validation_loss,
)
from nmoe_protocol import messages as wire
from nmoe_protocol.codec import WireMessage
from nmoe_protocol.sealing import WAVE_FEATURES, WAVE_LOGITS, public_key_bytes

from .node import (
    EXPERT_GROUP,
    FE_GROUP,
    FEDAVG_GROUP,
    GATE_CACHE,
    LOCAL_HEAD_GROUP,
    OWN_HEAD_GROUP,
    SHARED_EXPERT_GROUP,
    Node,
    gate_group,
    open_node,
)
from .policy import PolicyError

PENDING_PREFIX = "scratch/pending."
CORRELATION_KEY = "corr"

app = ClientApp()
Request = TypeVar("Request", bound=WireMessage)


def handles(request_type: type[Request]) -> Callable[[Callable[[Node, Request], WireMessage]], Any]:
    """Register `fn(node, request) -> reply` for `request_type`'s message type: decode, open the
    node, encode; any exception becomes an error reply with the reason."""

    def register(
        fn: Callable[[Node, Request], WireMessage],
    ) -> Callable[[Message, Context], Message]:
        @wraps(fn)
        def handler(msg: Message, context: Context) -> Message:
            try:
                request = request_type.from_message(msg)
                setup = request.config_json if isinstance(request, wire.SetupRequest) else None
                node = open_node(context, setup)
                return Message(fn(node, request).to_content(), reply_to=msg)
            except Exception as err:  # every failure becomes a reply
                reason = f"{type(err).__name__}: {err}"
                log(WARNING, "%s rejected: %s", msg.metadata.message_type, reason)
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                if request_type is wire.SetupRequest:  # a refusal: the server will not ask again
                    code = wire.SETUP_REFUSED
                    reason = wire.setup_refusal(*partition_of(context), reason)
                return Message(Error(code=code, reason=reason), reply_to=msg)

        category, _, action = request_type.TYPE.partition(".")
        register_on_app = getattr(app, category)
        (register_on_app(action) if action else register_on_app())(handler)
        return handler

    return register


def partition_of(context: Context) -> tuple[int | None, int | None]:
    """(partition id, number of partitions) of this node's config, None where unreadable."""
    try:
        return (
            int(context.node_config["partition-id"]),
            int(context.node_config["num-partitions"]),
        )
    except (KeyError, TypeError, ValueError):
        return None, None


# ---------------------------------------------------------------------------- set-up
@handles(wire.SetupRequest)
def setup(node: Node, request: wire.SetupRequest) -> wire.NodeInfo:
    """Keep the run's config; report who this node is and what it holds."""
    d = node.data
    _, labels = node.labelled_train()
    return wire.NodeInfo(
        partition_id=node.pid,
        num_partitions=node.num_partitions,
        num_train=len(d.train_y),
        num_labelled=len(labels),
        num_test=len(d.test_y),
        num_global=len(d.global_y),
        label_counts=[int((labels == c).sum()) for c in range(node.num_classes)],
        image_shape=list(node.image_shape),
        num_classes=node.num_classes,
        holds=node.state.holds(),
        public_key=public_key_bytes(node.key),
        data_source=node.data_source,
    )


# ---------------------------------------------------------------------------- stage 1
def _checked_correlation(arrays: dict[str, np.ndarray], dim: int) -> torch.Tensor:
    """C_ext as the server sent it: one finite (dim, dim) matrix under CORRELATION_KEY."""
    if set(arrays) != {CORRELATION_KEY}:
        raise ValueError(f"others_correlation must hold exactly '{CORRELATION_KEY}'")
    value = np.asarray(arrays[CORRELATION_KEY])
    if value.shape != (dim, dim) or not np.isfinite(value).all():
        raise ValueError(f"others_correlation must be a finite ({dim}, {dim}) matrix")
    return torch.from_numpy(value.astype(np.float32))


@handles(wire.CorrelationRequest)
def correlation(node: Node, request: wire.CorrelationRequest) -> wire.CorrelationReply:
    """FedSC with shared correlations: this client's correlation matrix of the fresh global model
    (eval mode, no training; `fe.correlation_noise` added here, on the device)."""
    fe_cfg = node.cfg.fe
    bundle = node.bundle(request.params, "fedsc")
    x, _, _, _, _, _ = node.stage1_data("fedsc")
    corr = client_correlation(
        bundle,
        x,
        node.augmentation(),
        mu=float(fe_cfg.mu),
        passes=int(fe_cfg.correlation_passes),
        noise_std=float(fe_cfg.correlation_noise),
        generator=torch.Generator().manual_seed(node.seed(2, request.server_round)),
    )
    return wire.CorrelationReply(correlation={CORRELATION_KEY: corr.numpy()}, num_examples=len(x))


@handles(wire.ExtractorRequest)
def train_fe(node: Node, request: wire.ExtractorRequest) -> wire.ExtractorReply:
    """One local update of the parts the method trains (F + head, F + projector, or all)."""
    method = request.method
    bundle = node.bundle(request.params, method)
    fe_cfg = node.cfg.fe
    c_ext = None
    if request.others_correlation is not None:
        dim = int(node.cfg.model.projector_dim)
        c_ext = _checked_correlation(request.others_correlation, dim)
    epochs, lr, batch_size = int(fe_cfg.local_epochs), float(fe_cfg.lr), int(fe_cfg.batch_size)
    weight_decay, grad_clip = float(fe_cfg.weight_decay), float(fe_cfg.grad_clip)
    if request.schedule == "fedavg":  # the FedAvg baseline's own FedCE schedule
        b = node.cfg.baseline
        epochs, lr, batch_size = (
            int(b.fedavg_local_epochs),
            float(b.fedavg_lr),
            int(b.fedavg_batch_size),
        )
        weight_decay, grad_clip = 0.0, 0.0
    elif fe_cfg.cosine_lr:
        rounds = int(fe_cfg.rounds)
        lr = round_lr(lr, min(request.server_round, rounds) - 1, rounds)
    x, y, mask, val_x, val_y, val_mask = node.stage1_data(method)
    augment = node.augmentation() if method != "fedce" else None
    mu = float(fe_cfg.mu)
    tau = float(fe_cfg.logit_adjust) if request.schedule != "fedavg" and method != "fedsc" else 0.0
    log_prior = label_log_prior(y[mask], node.num_classes) if tau > 0 and mask.any() else None
    # the validation score is the received (global) model's, before local training: the server
    # keeps the aggregate that validates best, not one whose clients' local updates did
    val_loss = stage1_validation_loss(
        bundle,
        method,
        val_x,
        val_y,
        val_mask,
        augment,
        mu=mu,
        ssl_weight=float(fe_cfg.ssl_weight),
        seed=node.seed(12),
        log_prior=log_prior,
        logit_adjust=tau,
    )
    val_score = None if val_loss is None else -val_loss
    result = train_extractor(
        bundle,
        x,
        y,
        method=method,
        epochs=epochs,
        lr=lr,
        momentum=float(fe_cfg.momentum),
        batch_size=batch_size,
        seed=node.seed(1, request.server_round),
        labelled=mask,
        ssl_weight=float(fe_cfg.ssl_weight),
        mu=mu,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        augment=augment,
        c_ext=c_ext,
        alpha=float(request.alpha) if c_ext is not None else 1.0,
        logit_adjust=tau,
    )
    trained = stage1_keys(bundle, method)
    params = {k: v for k, v in state_numpy(bundle).items() if k in trained}
    test_acc = None
    if method != "fedsc":
        test_acc = accuracy(forward_batched(bundle.classify, node.data.test_x), node.data.test_y)
    return wire.ExtractorReply(
        params=params,
        num_examples=len(x),
        loss=result.loss,
        ce_loss=result.ce_loss,
        ssl_loss=result.ssl_loss,
        test_acc=test_acc,
        val_score=val_score,
    )


# ---------------------------------------------------------------------------- shared parts
@handles(wire.InstallRequest)
def install(node: Node, request: wire.InstallRequest) -> wire.Installed:
    """Install a part the server holds; only keys of that part's shared keys are accepted."""
    if request.part == "peer_keys":
        node.pin(request.params)
        return wire.Installed(keys=len(request.params))
    if request.part in ("fe", "fedavg"):
        node.bundle(request.params, str(node.cfg.fe.method) if request.part == "fe" else "fedce")
        node.state.put(FE_GROUP if request.part == "fe" else FEDAVG_GROUP, request.params)
    elif request.part == "shared_expert":
        load_numpy(build_expert(node.cfg.model, node.num_classes, 0), request.params)
        node.state.put(SHARED_EXPERT_GROUP, request.params)
    else:
        gate = gates.get(str(request.gate))
        current = node.gate_params(gate.name)
        allowed = set(gate.installable_keys(node.cfg.gate, sorted(current)))
        foreign = sorted(set(request.params) - allowed)
        if foreign:
            raise ValueError(f"keys the server may not set on gate '{gate.name}': {foreign[:5]}")
        updated = {**current, **request.params}
        _check_like(updated, current)
        node.state.put(gate_group(gate.name), updated)
    node.state.persist()
    return wire.Installed(keys=len(request.params))


def _check_like(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """Same keys and shapes as `reference`, all finite."""
    if set(arrays) != set(reference):
        raise ValueError(f"keys differ from the gate's: {sorted(set(arrays) ^ set(reference))[:5]}")
    for key, value in arrays.items():
        if value.shape != reference[key].shape:
            raise ValueError(
                f"shape mismatch for '{key}': got {value.shape}, expected {reference[key].shape}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"non-finite values (NaN/Inf) in '{key}'")


# ---------------------------------------------------------------------------- stage 2
@handles(wire.SharedExpertRequest)
def train_shared_expert(node: Node, request: wire.SharedExpertRequest) -> wire.TrainReply:
    """One FedAvg round of the shared expert H_0 on the installed F's features."""
    expert = build_expert(node.cfg.model, node.num_classes, int(node.cfg.seed))
    load_numpy(expert, request.params)
    ex = node.cfg.expert
    x, y, _, val_x, val_y, _ = node.stage1_data("fedce")  # labelled; validation with fe.patience
    fe = node.extractor()
    val_score = None  # the received H_0's score, before local training (with fe.patience)
    if len(val_y):
        val_score = -validation_loss(expert, forward_batched(fe, val_x), val_y)
    loss = train_classifier(
        expert,
        forward_batched(fe, x),
        y,
        epochs=int(ex.shared_local_epochs) or int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(5, request.server_round),
    )
    return wire.TrainReply(
        params=state_numpy(expert), num_examples=len(y), loss=loss, val_score=val_score
    )


@handles(wire.ExpertRequest)
def train_expert(node: Node, request: wire.ExpertRequest) -> wire.ExpertReply:
    """Stage 2: the personal expert on the installed F's features (F frozen), from scratch or
    fine-tuned from the installed shared expert."""
    fe = node.extractor()
    if request.init == "shared":
        expert = node.expert(SHARED_EXPERT_GROUP)
    else:
        expert = build_expert(node.cfg.model, node.num_classes, node.seed())
    x, y = node.split("expert")
    feats, ex = forward_batched(fe, x), node.cfg.expert
    proximal = float(ex.proximal) if request.init == "shared" else 0.0
    schedule = dict(epochs=int(ex.epochs), lr=float(ex.lr), batch_size=int(ex.batch_size))
    loss = train_classifier(expert, feats, y, **schedule, seed=node.seed(3), proximal=proximal)
    if bool(ex.local_head):  # the same schedule, no pull, and every labelled image: no gate
        # learns from this head's outputs, so none is held out for one
        if ex.local_head_init == "stage1":
            head = node.installed_bundle().head
        else:
            head = node.expert(SHARED_EXPERT_GROUP)
        x_all, y_all = node.split("train")
        train_classifier(head, forward_batched(fe, x_all), y_all, **schedule, seed=node.seed(3))
        node.state.put(LOCAL_HEAD_GROUP, state_numpy(head))
    else:  # a head kept from an earlier training must not answer for this expert
        node.state.drop(LOCAL_HEAD_GROUP)
    node.state.put(EXPERT_GROUP, state_numpy(expert))
    node.state.persist()
    test_acc = accuracy(
        forward_batched(expert, forward_batched(fe, node.data.test_x)), node.data.test_y
    )
    return wire.ExpertReply(num_examples=len(y), loss=loss, test_acc=test_acc)


# ---------------------------------------------------------------------------- baselines
@handles(wire.OwnHeadRequest)
def train_own_head(node: Node, request: wire.OwnHeadRequest) -> wire.ExpertReply:
    """FedPer/FedRep-style baseline: the global head, fine-tuned on all local training data."""
    bundle = node.installed_bundle()
    ex = node.cfg.expert
    x, y = node.labelled_train()
    loss = train_classifier(
        bundle.head,
        forward_batched(bundle.fe, x),
        y,
        epochs=int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(4),
    )
    node.state.put(OWN_HEAD_GROUP, state_numpy(bundle.head))
    node.state.persist()
    test_acc = accuracy(forward_batched(bundle.classify, node.data.test_x), node.data.test_y)
    return wire.ExpertReply(num_examples=len(y), loss=loss, test_acc=test_acc)


@handles(wire.LocalOnlyRequest)
def train_local_only(node: Node, request: wire.LocalOnlyRequest) -> wire.Accuracies:
    """Baseline: F + head and an expert trained on this client's data alone; accuracies only."""
    fe_cfg, ex, b = node.cfg.fe, node.cfg.expert, node.cfg.baseline
    bundle = node.bundle()
    x, y = node.labelled_train()
    run = train_supervised_until_converged(
        bundle,
        x,
        y,
        max_epochs=int(b.epochs),
        patience=int(b.patience),
        val_fraction=float(b.val_fraction),
        lr=float(fe_cfg.lr),
        momentum=float(fe_cfg.momentum),
        batch_size=int(fe_cfg.batch_size),
        seed=node.seed(6),
    )
    expert = build_expert(node.cfg.model, node.num_classes, node.seed())
    train_classifier(
        expert,
        forward_batched(bundle.fe, x),
        y,
        epochs=int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(7),
    )
    reply = accuracies(node, len(y), [partial(forward_batched, lambda x: expert(bundle.fe(x)))])
    return dataclasses.replace(reply, epochs_run=int(run["epochs_run"]))


def accuracies(node: Node, num_examples: int, answerers: list[Callable]) -> wire.Accuracies:
    """Each answerer's accuracy on the local test split and (if the node holds one) the global
    set; an answerer takes a whole split (one task) and returns (n, C) class scores."""
    d = node.data
    return wire.Accuracies(
        num_examples=num_examples,
        acc_local=[accuracy(a(d.test_x), d.test_y) for a in answerers],
        acc_global=[accuracy(a(d.global_x), d.global_y) for a in answerers] if d.has_global else [],
    )


def at_task_prior(model: Callable, own_prior: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`model`'s class probabilities on the task `x` moved to the label prior estimated from the
    task's own rows (`fedavg_task_prior`)."""
    return move_to_task_prior(torch.softmax(forward_batched(model, x), dim=1), own_prior)


# ---------------------------------------------------------------------------- stage 3
@handles(wire.GateRequest)
def train_gate(node: Node, request: wire.GateRequest) -> wire.TrainReply:
    """Overwrite the received gate keys, train on the cached expert outputs, return the keys the
    gate's module declares shared for this round."""
    gate = gates.get(request.gate)
    if not gate.trainable:
        raise ValueError(
            f"gate '{gate.name}' is not trainable; trainable: {', '.join(gates.trainable())}"
        )
    params = node.gate_params(gate.name)
    unknown = sorted(set(request.params) - set(params))
    if unknown:
        raise ValueError(f"unknown parameter keys: {unknown[:5]}")
    params = {**params, **request.params}
    _check_like(params, node.gate_params(gate.name))
    cache = node.state.get(GATE_CACHE)
    answered = torch.from_numpy(cache["answered"]) > 0
    x, y = node.split("gate")
    data = GateData(node.features(x), y, torch.from_numpy(cache["logits"]), answered.all(dim=0))
    params, loss = gate.train(
        params, data, node.cfg.model, node.cfg.gate, node.seed(8, request.server_round)
    )
    node.state.put(gate_group(gate.name), params)
    node.state.persist()
    shared = gate.shared_keys(node.cfg.gate, request.server_round, sorted(params))
    return wire.TrainReply(params={k: params[k] for k in shared}, num_examples=len(y), loss=loss)


# ---------------------------------------------------------------------------- evaluation
@handles(wire.EvaluateRequest)
def evaluate(node: Node, request: wire.EvaluateRequest) -> wire.Accuracies:
    """Accuracies of the methods answered without routing, on local test and global test."""
    bundle = node.installed_bundle()
    fedavg = bundle  # the stage-1 model, or the separately trained FedCE model
    if node.state.has(FEDAVG_GROUP) and set(FEDAVG_MODEL_BASELINES) & set(request.methods):
        fedavg = node.bundle(node.state.get(FEDAVG_GROUP), "fedce")
    answerers: list[Callable] = []
    for method in request.methods:
        if method in ("local_expert", "local_head", "own_model"):
            held = {
                "local_expert": node.expert,
                "local_head": node.local_head,
                "own_model": node.own_model,
            }
            own = held[method]()
            if own is None:
                raise ValueError("this node holds no local head (expert.local_head)")
            model: Callable = lambda x, e=own: e(bundle.fe(x))
        elif method == "fedavg":
            model = fedavg.classify
        elif method == "fedavg_task_prior":
            prior = own_label_prior(node.own_labels(), node.num_classes)
            answerers.append(partial(at_task_prior, fedavg.classify, prior))
            continue
        else:
            head = node.bundle().head
            load_numpy(head, node.state.get(OWN_HEAD_GROUP))
            model = lambda x, h=head: h(bundle.fe(x))
        answerers.append(partial(forward_batched, model))
    return accuracies(node, len(node.data.test_y), answerers)


# ---------------------------------------------------------------------------- peer inference
def opened_logits(
    node: Node, request: wire.CombineRequest, with_familiarity: bool
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The experts' sealed answers opened: logits and (last column) familiarity ratios; an
    answer that fails authentication is dropped with a log line."""
    logits, familiarity = {}, {}
    limit = int(node.cfg.max_query_batch)
    for e, blob in request.logits.items():
        try:
            value = node.open(e, blob, request.query_id, WAVE_LOGITS, limit)
        except ValueError as err:
            log(WARNING, "query.combine: answer of expert %d refused: %s", e, err)
            continue
        if with_familiarity and value.ndim == 2 and value.shape[1] >= 2:
            value, familiarity[e] = value[:, :-1], value[:, -1].copy()
        logits[e] = np.ascontiguousarray(value)
    return logits, familiarity


def pending_queries(node: Node) -> list[str]:
    """The routed queries waiting for their combine wave, after dropping the expired ones."""
    now, waiting = time.time(), []
    for name in [n for n in node.state.state.array_records if n.startswith(PENDING_PREFIX)]:
        arrays = node.state.get(name)
        if now - float(arrays["created"][0]) > node.policy.pending_ttl_s:
            node.state.drop(name)
            if PendingQuery.from_arrays(arrays).mode == "serve":  # its inputs wait again
                node.inbox().release(name[len(PENDING_PREFIX) :])
        else:
            waiting.append(name)
    return waiting


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


@handles(wire.RouteRequest)
def route(node: Node, request: wire.RouteRequest) -> wire.RouteReply:
    """Wave 1: features and routing weights for every split the query names (one concatenated
    batch); one feature batch per remote expert."""
    for split in ["gate"] if request.mode == "cache" else request.splits:
        node.policy.share(split)
    waiting = pending_queries(node)
    if len(waiting) >= node.policy.max_pending:
        raise PolicyError(
            f"{len(waiting)} routed queries are waiting for their combine wave "
            f"(node config max-pending={node.policy.max_pending})"
        )
    if request.mode == "serve":  # the inbox: new inputs, no labels
        items = node.inbox().claim(
            request.query_id, min(int(node.cfg.serve.max_batch), node.policy.max_rows)
        )
        if not items:
            return wire.RouteReply(features={}, num_examples=0)
        try:
            return route_rows(node, request, [(node.inbox().read(items), no_labels(items))])
        except Exception:
            node.inbox().release(request.query_id)  # the inputs wait for the next query
            raise
    return route_rows(node, request, [node.split(name) for name in request.splits])


def no_labels(items: list) -> torch.Tensor:
    return torch.full((len(items),), -1, dtype=torch.long)


def route_rows(
    node: Node, request: wire.RouteRequest, parts: list[tuple[torch.Tensor, torch.Tensor]]
) -> wire.RouteReply:
    """Wave 1 on the rows of `parts` (images, labels): plan, keep, send."""
    k = int(node.cfg.gate.k)
    node.policy.rows(sum(len(p[1]) for p in parts))
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    reachable = node.reachable(request.neighbours)
    fe = node.extractor()
    feats = forward_batched(fe, x)
    generator = torch.Generator().manual_seed(node.seed(9, request.seed))
    if request.mode in ("cache", "oracle"):  # every reachable expert answers every sample
        weights = reachable.float().expand(len(x), -1).clone()
    else:
        gate = gates.get(request.gate)
        params = node.state.get(gate_group(gate.name)) if gate.trainable else {}
        weights = gate.weights(params, feats, reachable, k, node.cfg.model, generator)
    gated = request.mode in wire.GATED_MODES
    configured = float(node.cfg.gate.local_first_quantile) if gated else 0.0
    quantile = node.policy.local_first(configured) if gated else 0.0
    own_feats = forward_batched(fe, node.data.train_x) if quantile > 0 else None
    local = node.local_rows(feats, own_feats, quantile) if own_feats is not None else None
    shift = node.prior_shift(gates.get(request.gate)) if gated else None
    # the own model answers the local-first rows and, with the own share, its part of every row
    own_model = node.own_model() if local is not None or (shift and shift.own_share) else None
    plan = plan_query(feats, weights, node.local_experts(), node.pid, local, own_model)
    own_ratio = None
    if gated and gates.get(request.gate).asks_familiarity:
        own_ratio = node.familiarity(fe, feats)
    pending = PendingQuery(
        plan, y, [len(p[1]) for p in parts], request.mode, request.gate, own_ratio, time.time()
    )
    node.state.put(PENDING_PREFIX + request.query_id, pending.to_arrays())
    noise = node.policy.feature_noise(float(node.cfg.feature_noise_std))
    sent = {e: v.numpy() for e, v in outgoing_features(plan, feats, noise, generator).items()}
    if node.cfg.seal_payloads:
        pins = node.pins()
        unsealable = sorted(e for e in sent if e not in pins)
        if unsealable:  # not in this run's set-up (down at discovery): nothing can reach it
            log(WARNING, "query.route: no key pinned for expert(s) %s: not sent", unsealable)
        sent = {
            e: node.seal(e, v, request.query_id, WAVE_FEATURES)
            for e, v in sent.items()
            if e in pins
        }
    return wire.RouteReply(features=sent, num_examples=len(y))


@handles(wire.ExpertQuery)
def expert_answer(node: Node, request: wire.ExpertQuery) -> wire.ExpertAnswer:
    """Wave 2: this node's personal expert on every feature batch addressed to it (sealed
    payloads opened and answered sealed; a bad batch fails alone, the others are answered)."""
    dim, limit = int(node.cfg.model.feature_dim), int(node.cfg.max_query_batch)
    checked, refused = {}, []
    for pid, value in request.batches.items():
        try:
            if node.cfg.seal_payloads:
                value = node.open(pid, value, request.query_id, WAVE_FEATURES, limit)
            elif node.policy.require_sealing:
                raise PolicyError("an unsealed feature batch (node config require-sealing=true)")
            checked[pid] = check_features(value, dim, limit, f"batch from {pid}")
        except ValueError as err:  # SealError and PolicyError are ValueErrors
            refused.append(f"batch from {pid}: {err}")
            log(WARNING, "query.expert: %s", refused[-1])
    if not checked:
        raise ValueError(f"no valid feature batch: {'; '.join(refused)}")
    node.policy.rows(sum(len(v) for v in checked.values()))
    logits = {pid: v.numpy() for pid, v in answer(node.expert(), checked).items()}
    familiarity = None
    if request.with_familiarity:
        fe = node.extractor()
        familiarity = {pid: node.familiarity(fe, v).numpy() for pid, v in checked.items()}
    if node.cfg.seal_payloads:  # the familiarity column travels sealed with the logits
        logits = {
            pid: node.seal(
                pid,
                v if familiarity is None else np.column_stack([v, familiarity[pid]]),
                request.query_id,
                WAVE_LOGITS,
            )
            for pid, v in logits.items()
        }
        familiarity = None
    return wire.ExpertAnswer(
        logits=logits, num_examples=sum(len(v) for v in checked.values()), familiarity=familiarity
    )


@handles(wire.CombineRequest)
def combine_answer(node: Node, request: wire.CombineRequest) -> wire.CombineReply:
    """Wave 3: combine local and returned logits (renormalising over the experts that did not
    answer), or keep them as the gate-training cache. Reports per split of the query."""
    name = PENDING_PREFIX + request.query_id
    pending = PendingQuery.from_arrays(node.state.get(name))
    asks = pending.mode in wire.GATED_MODES and gates.get(pending.gate).asks_familiarity
    returned, familiarity = request.logits, dict(request.familiarity or {})
    if node.cfg.seal_payloads:
        returned, familiarity = opened_logits(node, request, asks)
    remote = {}
    for e, value in returned.items():  # an expert whose answer is malformed is dropped
        index = pending.plan.remote_index.get(e)
        expected = None if index is None else (len(index), node.num_classes)
        if value.shape != expected or value.dtype != np.float32 or not np.isfinite(value).all():
            log(
                WARNING,
                "query.combine: logits of expert %d dropped (%s%s)",
                e,
                value.dtype,
                list(value.shape),
            )
            continue
        remote[e] = torch.from_numpy(np.array(value))
    if pending.mode == "cache":
        logits, answered = assemble(pending.plan, remote, node.num_classes)
        node.state.drop(name)
        node.state.put(GATE_CACHE, {"logits": logits, "answered": answered.float()})
        size = len(pending.labels)
        return wire.CombineReply(
            num_examples=[size],
            accuracy=[0.0],
            degraded=[0],
            answered_locally=[0],
            route_counts=[size] * node.num_experts,
            num_experts=node.num_experts,
            experts_cached=int(answered.all(dim=0).sum()),
        )
    reweight, ratios, shift = None, {}, None
    if asks:
        gate, gate_cfg = gates.get(pending.gate), node.cfg.gate
        shift = node.prior_shift(gate)
        reweight = partial(
            gate.reweight,
            own=node.pid,
            shared=node.shared_expert_id,
            k=int(gate_cfg.k),
            gate_cfg=gate_cfg,
        )
        for e, value in familiarity.items():
            if e in remote and not np.isnan(value).any():  # inf means: not familiar at all
                ratios[e] = torch.from_numpy(np.array(value, dtype=np.float32))
    reports = finish_query(pending, remote, node.num_classes, node.pid, ratios, reweight, shift)
    node.state.drop(name)
    if pending.mode == "serve":  # predictions stay on the device: the server gets counts only
        inbox = node.inbox()
        inbox.answer(inbox.claimed(request.query_id), reports[0].probabilities, "federation")
        (report,) = reports
        return wire.CombineReply(
            num_examples=[report.num_examples],
            accuracy=[0.0],
            degraded=[report.degraded],
            answered_locally=[report.answered_locally],
            route_counts=report.route_counts,
            num_experts=node.num_experts,
        )
    return wire.CombineReply(
        num_examples=[r.num_examples for r in reports],
        accuracy=[r.accuracy for r in reports],
        degraded=[r.degraded for r in reports],
        answered_locally=[r.answered_locally for r in reports],
        route_counts=[c for r in reports for c in r.route_counts],
        num_experts=node.num_experts,
        predictions=[p for r in reports for p in r.predictions]
        if request.return_predictions and node.policy.share_predictions
        else None,
    )
