"""Typed configuration: Hydra composes `conf/`, these dataclasses type-check it.

Both entry points (the ServerApp under `flwr run` and the Hydra CLI) call
`compose_config`, so one set of defaults and one validation serve them all.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import datasets as dataset_registry
from . import gates
from .models import PROJECTOR_NORMS, STAGE1_PARTS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

FE_METHODS = tuple(STAGE1_PARTS)
DATASETS = tuple(dataset_registry.DATASETS)
PARTITIONS = ("iid", "dirichlet", "pathological")
EXTRACTORS = ("cnn", "resnet")
TOPOLOGIES = ("full", "ring", "regular", "geometric")
# baselines besides the gates: the FedAvg model, FedRep-style heads, local-only, pooled data
MODEL_BASELINES = (
    "fedavg",
    "fedavg_task_prior",
    "shared_fe_own_head",
    "local_only",
    "centralized",
    "oracle_router",
)
BASELINES = MODEL_BASELINES + gates.names()
FEDAVG_MODEL_BASELINES = ("fedavg", "fedavg_task_prior")  # the baselines the FedAvg model answers
ALL_BASELINES = "all"  # `baselines=[all]`: every baseline above, the registry's gates included
LOG_LEVELS = ("quiet", "info", "verbose")
MODES = ("train", "inference", "serve")
AGGREGATIONS = ("fedavg", "median", "trimmed_mean")
# what answers in the mixture's shared slot (`expert.shared_model`): H_0, a FedAvg expert on the
# frozen F, or stage 1's own global model (F + its head: what `fedavg` is under FedCE)
SHARED_MODELS = ("expert", "stage1")
LOCAL_HEAD_INITS = ("shared_expert", "stage1")  # what `expert.local_head` is fine-tuned from
# what answers a device's own rows (`expert.own_model`): its local head, or the mean of the head's
# and its expert's probabilities
OWN_MODELS = ("local_head", "head_and_expert")


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


@dataclass
class DatasetConfig:
    name: str = "digits"
    path: Optional[str] = None  # local folder: torchvision's FashionMNIST/raw, cifar-10-batches-py
    hf_name: Optional[str] = None  # HF cache id (read offline); None = the dataset's usual one
    local_test_fraction: float = 0.2
    global_test_fraction: float = 0.2
    max_samples: int = 0  # 0 = all; keep the first N images (quick runs; prefer subsample)
    subsample: int = 0  # 0 = all; class-stratified N images, fixed seed (same for every run seed)
    label_fraction: float = 1.0  # share of each client's training images that keep their label
    server_val_dir: Optional[str] = None  # a data-dir held by the server: the probe's data
    verify_checksums: bool = True  # official CIFAR-10 folders (with batches.meta): check MD5s


@dataclass
class PartitionConfig:
    kind: str = "dirichlet"
    alpha: float = 0.3
    classes_per_client: int = 2
    min_partition_size: int = 10


@dataclass
class ModelConfig:
    extractor: str = "cnn"
    feature_dim: int = 64
    cnn_channels: int = 32
    cnn_stride: int = 1  # the first conv layer's stride (2: a quarter of the cost on 28x28 images)
    resnet_width: int = 16
    resnet_blocks: int = 1
    expert_hidden: int = 64
    expert_input_norm: bool = False  # experts normalise each feature row first (scale-free)
    gate_hidden: int = 32
    projector_dim: int = 64
    projector_norm: str = "batch"  # SSL projector: batch-normalised hidden layer, or none


@dataclass
class FEConfig:
    method: str = "fedce"
    rounds: int = 10
    local_epochs: int = 3
    lr: float = 0.05  # base learning rate (round 1's with cosine_lr)
    momentum: float = 0.9
    batch_size: int = 32
    # the local optimiser (SGD): the FedSC reference uses weight decay 5e-4, a gradient-norm clip
    # of 3 and a cosine learning rate over the rounds (conf/fe/fedsc.yaml, hybrid.yaml)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm per step (0 = off)
    cosine_lr: bool = False  # lr * (1 + cos(pi (round - 1) / rounds)) / 2, constant within a round
    ssl_weight: float = 1.0  # lambda in CE + lambda * SSL (hybrid)
    # tau of a logit-adjusted CE (fedce, hybrid): each client trains on logits + tau log(its label
    # prior), so skewed clients stop pulling the shared head to their classes (FedLC-style); 0 =
    # plain CE. With it on, the `fedavg` baseline gets a plain FedCE run of its own.
    logit_adjust: float = 0.0
    # server momentum of stage 1 (Flower's FedAvgM, Hsu et al. 2019): the server steps along
    # beta * previous step + (current - average) instead of taking the average; 0 = FedAvg. With
    # it on, the `fedavg` baseline gets a plain FedCE run of its own. Needs aggregation=fedavg.
    server_momentum: float = 0.0
    # FedSC (and hybrid's SSL part), in the reference's units: projector outputs are clipped to
    # squared norm `mu` (radius sqrt(mu)); with share_correlation each round starts with every
    # client's correlation of the fresh global model (eval mode, `correlation_passes` passes of
    # two views, Gaussian noise of std `correlation_noise`), and the local loss uses
    # alpha tr(RR) + 2 (1 - alpha) tr(R C_ext), alpha ramped from 1 to alpha_min over `rounds`
    mu: float = 4.0
    share_correlation: bool = False
    correlation_noise: float = 0.0
    correlation_passes: int = 1
    alpha_min: float = 0.2
    augment_strength: float = 1.0  # scales the dataset's augmentation policy (nmoe/augment.py)
    # linear probe of F every `probe_every` rounds (0 = never) and of the random initialisation
    # (nmoe/probe.py: standardised features, logistic regression to convergence); its data only
    # where the server may hold some (simulation, or dataset.server_val_dir)
    probe_every: int = 1
    # Convergence: with patience > 0, each client holds `val_fraction` of its training data out of
    # stage 1 and reports a validation loss (CE of F + head; FedSC: its SSL loss); stage 1 stops
    # after `patience` rounds without improvement (`rounds` is the cap) and keeps the best round.
    patience: int = 0
    val_fraction: float = 0.1
    min_delta: float = 0.001


@dataclass
class BaselineConfig:
    """Schedules of the baselines trained beside NMoE, each its own and each to convergence."""

    # the `fedavg` baseline's FedCE run when stage 1 is not FedCE (early stopping: fe.patience)
    fedavg_rounds: int = 100
    fedavg_local_epochs: int = 3
    fedavg_lr: float = 0.05
    fedavg_batch_size: int = 32
    # `local_only` and `centralized`: at most `epochs`, stopping after `patience` epochs without
    # improvement of the CE loss on `val_fraction` of their training data (0 = run every epoch)
    epochs: int = 100
    patience: int = 10
    val_fraction: float = 0.1


@dataclass
class ExpertConfig:
    epochs: int = 15
    lr: float = 0.01
    batch_size: int = 32
    gate_holdout_fraction: float = 0.2  # local training data kept from the expert for the gate
    shared_expert: bool = False
    shared_rounds: int = 5  # at most (fe.patience stops earlier, on the stage-1 validation part)
    shared_local_epochs: int = 0  # epochs per FedAvg round of the shared expert (0 = epochs)
    init_from_shared: bool = False  # personal experts start from the trained shared expert
    # with init_from_shared: weight of a proximal term ||w - w_shared||^2 / 2 that keeps each
    # personal expert near the shared expert it starts from (Ditto-style; 0 = plain fine-tuning)
    proximal: float = 0.0
    # also fine-tune a plain head (no pull, every labelled image) that answers the rows
    # local-first keeps on the device and is the device's own model of the gate's own share
    # (reported alone as `local_head`); peers and the gates get the expert. It starts from the
    # shared expert H_0 (`local_head_init: shared_expert`, with proximal > 0: without the pull
    # the expert is that head) or from stage 1's head on F (`stage1`: FedRep's personal head)
    local_head: bool = False
    local_head_init: str = "shared_expert"
    # what answers the device's own rows (local-first) and its own share: its local head
    # (`local_head`) or the mean of the local head's and its expert's class probabilities
    # (`head_and_expert`); without a local head (local_head=false), its expert either way
    own_model: str = "local_head"
    shared_model: str = "expert"  # the shared slot: "expert" (H_0) or "stage1" (F + its head)


@dataclass
class GateCommonConfig:
    """Keys every gate has; each gate module adds its own (`Options`) to `GateConfig`."""

    method: str = "fedgate"
    k: int = 2
    rounds: int = 5
    local_epochs: int = 2
    lr: float = 0.01
    batch_size: int = 32
    noise_std: float = 1.0
    # Local-first inference: a sample at least as close to the client's own training features as
    # this quantile of their nearest-neighbour distances goes to the own expert alone (0 = off).
    local_first_quantile: float = 0.0
    # ... unless stage 1's head gives it more than this probability for a class of which the own
    # expert trained on fewer than `local_first_class_min` images (0 = no such check)
    local_first_class_confidence: float = 0.0
    local_first_class_min: int = 3


def _gate_config_class() -> type:
    """`GateConfig`: the common keys plus every registered gate's own keys, all typed."""
    fields: list[tuple[str, Any, Any]] = [
        (f.name, f.type, field(default=f.default)) for f in dataclasses.fields(GateCommonConfig)
    ]
    hints = typing.get_type_hints(GateCommonConfig)
    fields = [(name, hints[name], default) for name, _, default in fields]
    seen = {name for name, _, _ in fields}
    for gate in gates.GATES.values():
        if gate.Options is None:
            continue
        option_hints = typing.get_type_hints(gate.Options)
        for option in dataclasses.fields(gate.Options):
            if option.name in seen:
                raise RuntimeError(f"gate '{gate.name}' redefines config key gate.{option.name}")
            seen.add(option.name)
            fields.append((option.name, option_hints[option.name], field(default=option.default)))
    return dataclasses.make_dataclass("GateConfig", fields)


GateConfig = _gate_config_class()


@dataclass
class ServeConfig:
    """`mode=serve`: a long-lived run that answers what lands in the devices' inboxes."""

    interval_s: float = 2.0  # seconds between two sets of waves
    duration_s: float = 60.0  # how long the run serves (0: until the run is stopped)
    max_batch: int = 4096  # inputs one device answers per set of waves


@dataclass
class TopologyConfig:
    kind: str = "full"
    degree: int = 3
    radius: float = 0.5


@dataclass
class SimulationConfig:
    """Settings of the in-process simulation used by the Hydra CLI."""

    num_clients: int = 6
    client_cpus: float = 1.0
    ray_address: Optional[str] = None  # attach to an existing Ray cluster


@dataclass
class NMoEConfig:
    seed: int = 0
    output_dir: str = "outputs/latest"
    log_level: str = "info"
    round_timeout_s: float = 600.0
    poll_interval_s: float = 0.02  # how often the server asks the SuperLink for replies
    min_nodes: int = 2
    baselines: list[str] = field(default_factory=list)  # names of BASELINES, or [all]
    feature_noise_std: float = 0.0  # Gaussian noise on features sent to peers
    max_query_batch: int = 100_000  # clients refuse larger feature batches
    torch_threads: int = 1  # torch threads per process, clients and server (0 = torch default)
    min_reply_fraction: float = 0.5  # a round counts if at least this fraction replied
    seal_payloads: bool = True  # peer features and logits end-to-end encrypted (relay sees sizes)
    aggregation: str = "fedavg"  # fedavg | median | trimmed_mean (Flower's robust aggregators)
    aggregation_trim: float = 0.2  # trimmed_mean: the fraction cut at each end
    round_retries: int = 1  # retries of a round that got too few replies
    audit_messages: bool = False  # describe every message crossing the grid in messages.jsonl
    state_key: Optional[str] = None  # folder name of the clients' saved state (default: run id)
    mode: str = "train"  # train | inference (reuse the state saved under state_key)
    record_predictions: bool = False  # store every routed prediction in results.json
    resume: Optional[str] = None  # output dir of an interrupted run: continue from its checkpoint
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fe: FEConfig = field(default_factory=FEConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"got '{value}', allowed values: {', '.join(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming the key of the first invalid value."""
    _choice(cfg.dataset.name, "dataset.name", DATASETS)
    _choice(cfg.partition.kind, "partition.kind", PARTITIONS)
    _choice(cfg.model.extractor, "model.extractor", EXTRACTORS)
    _choice(cfg.model.projector_norm, "model.projector_norm", PROJECTOR_NORMS)
    _choice(cfg.fe.method, "fe.method", FE_METHODS)
    _choice(cfg.gate.method, "gate.method", gates.names())
    for gate in gates.GATES.values():
        used = gate.name == cfg.gate.method or gate.name in cfg.baselines
        gate.validate(cfg, used, _require)
    _choice(cfg.topology.kind, "topology.kind", TOPOLOGIES)
    _choice(cfg.log_level, "log_level", LOG_LEVELS)
    _choice(cfg.mode, "mode", MODES)
    _choice(cfg.aggregation, "aggregation", AGGREGATIONS)
    _require(
        0 <= cfg.aggregation_trim < 0.5,
        "aggregation_trim",
        f"must be in [0, 0.5), got {cfg.aggregation_trim}",
    )
    _require(
        cfg.state_key is None or bool(STATE_KEY_PATTERN.match(str(cfg.state_key))),
        "state_key",
        "must be one name of at most 64 letters, digits, '.', '_' or '-' (not starting with "
        f"'.', '_' or '-'), got {cfg.state_key!r}",
    )
    _require(cfg.serve.interval_s > 0, "serve.interval_s", "must be > 0")
    _require(cfg.serve.duration_s >= 0, "serve.duration_s", "must be >= 0")
    _require(cfg.serve.max_batch > 0, "serve.max_batch", "must be > 0")
    _require(
        cfg.mode == "train" or bool(cfg.state_key),
        "state_key",
        f"mode {cfg.mode} needs the state_key under which a training run saved the clients' state",
    )
    for name in cfg.baselines:
        _choice(name, "baselines", BASELINES)
    _require(cfg.partition.alpha > 0, "partition.alpha", f"must be > 0, got {cfg.partition.alpha}")
    _require(cfg.partition.classes_per_client > 0, "partition.classes_per_client", "must be > 0")
    for key in (
        "fe.rounds",
        "gate.rounds",
        "expert.epochs",
        "expert.shared_rounds",
        "fe.local_epochs",
        "fe.correlation_passes",
        "gate.local_epochs",
        "fe.batch_size",
        "expert.batch_size",
        "gate.batch_size",
        "model.feature_dim",
        "model.cnn_channels",
        "model.cnn_stride",
        "model.expert_hidden",
        "model.gate_hidden",
        "model.projector_dim",
        "gate.k",
        "min_nodes",
        "max_query_batch",
        "simulation.num_clients",
        "baseline.fedavg_rounds",
        "baseline.fedavg_local_epochs",
        "baseline.fedavg_batch_size",
        "baseline.epochs",
    ):
        value = OmegaConf.select(cfg, key)
        _require(value > 0, key, f"must be > 0, got {value}")
    for key in ("fe.patience", "baseline.patience", "fe.min_delta"):
        value = OmegaConf.select(cfg, key)
        _require(value >= 0, key, f"must be >= 0, got {value}")
    for key in ("fe.val_fraction", "baseline.val_fraction"):
        value = OmegaConf.select(cfg, key)
        _require(0 < value < 1, key, f"must be in (0, 1), got {value}")
    for key in (
        "fe.lr",
        "fe.mu",
        "expert.lr",
        "gate.lr",
        "baseline.fedavg_lr",
        "round_timeout_s",
        "poll_interval_s",
    ):
        value = OmegaConf.select(cfg, key)
        _require(value > 0, key, f"must be > 0, got {value}")
    for key in (
        "gate.noise_std",
        "feature_noise_std",
        "fe.correlation_noise",
        "fe.ssl_weight",
        "fe.logit_adjust",
        "expert.proximal",
        "fe.weight_decay",
        "fe.grad_clip",
        "fe.augment_strength",
        "fe.probe_every",
    ):
        value = OmegaConf.select(cfg, key)
        _require(value >= 0, key, f"must be >= 0, got {value}")
    _require(
        0 <= cfg.fe.server_momentum < 1,
        "fe.server_momentum",
        f"must be in [0, 1), got {cfg.fe.server_momentum}",
    )
    _require(
        cfg.fe.server_momentum == 0 or cfg.aggregation == "fedavg",
        "fe.server_momentum",
        f"steps along the average's direction: needs aggregation=fedavg, got {cfg.aggregation}",
    )
    _require(
        cfg.expert.proximal == 0 or bool(cfg.expert.init_from_shared),
        "expert.proximal",
        "pulls a personal expert towards the shared expert it starts from: needs "
        "expert.init_from_shared=true",
    )
    _choice(cfg.expert.local_head_init, "expert.local_head_init", LOCAL_HEAD_INITS)
    _require(
        not cfg.expert.local_head
        or cfg.expert.local_head_init != "shared_expert"
        or cfg.expert.proximal > 0,
        "expert.local_head",
        "fine-tuned from H_0 without the proximal pull: needs expert.proximal > 0 (without it "
        "the expert is that head), or expert.local_head_init=stage1",
    )
    _require(
        not cfg.expert.local_head
        or cfg.expert.local_head_init != "stage1"
        or "head" in STAGE1_PARTS[cfg.fe.method],
        "expert.local_head_init",
        f"'stage1' needs a stage 1 that trains a head (fedce, hybrid), not {cfg.fe.method}",
    )
    _choice(cfg.expert.own_model, "expert.own_model", OWN_MODELS)
    _require(
        not cfg.expert.init_from_shared or bool(cfg.expert.shared_expert),
        "expert.init_from_shared",
        "needs the shared expert to start from: use expert=with_shared",
    )
    _choice(cfg.expert.shared_model, "expert.shared_model", SHARED_MODELS)
    _require(
        cfg.expert.shared_model != "stage1" or "head" in STAGE1_PARTS[cfg.fe.method],
        "expert.shared_model",
        f"'stage1' needs a stage 1 that trains a head (fedce, hybrid), not {cfg.fe.method}",
    )
    _require(
        cfg.expert.shared_model != "stage1" or bool(cfg.expert.shared_expert),
        "expert.shared_model",
        "'stage1' fills the shared slot: use expert=with_shared",
    )
    _require(
        0 <= cfg.fe.alpha_min <= 1, "fe.alpha_min", f"must be in [0, 1], got {cfg.fe.alpha_min}"
    )
    _require(
        0 <= cfg.gate.local_first_quantile <= 1,
        "gate.local_first_quantile",
        f"must be in [0, 1], got {cfg.gate.local_first_quantile}",
    )
    _require(
        0 <= cfg.gate.local_first_class_confidence < 1,
        "gate.local_first_class_confidence",
        f"must be in [0, 1), got {cfg.gate.local_first_class_confidence}",
    )
    _require(
        cfg.gate.local_first_class_confidence == 0 or "head" in STAGE1_PARTS[cfg.fe.method],
        "gate.local_first_class_confidence",
        f"needs a stage 1 that trains a head (fedce, hybrid), not {cfg.fe.method}",
    )
    _require(cfg.gate.local_first_class_min >= 1, "gate.local_first_class_min", "must be >= 1")
    _require(
        0 <= cfg.expert.gate_holdout_fraction < 1,
        "expert.gate_holdout_fraction",
        f"must be in [0, 1), got {cfg.expert.gate_holdout_fraction}",
    )
    for key in ("dataset.local_test_fraction", "dataset.global_test_fraction"):
        value = OmegaConf.select(cfg, key)
        _require(0 < value < 1, key, f"must be in (0, 1), got {value}")
    _require(
        0 < cfg.min_reply_fraction <= 1,
        "min_reply_fraction",
        f"must be in (0, 1], got {cfg.min_reply_fraction}",
    )
    _require(cfg.round_retries >= 0, "round_retries", f"must be >= 0, got {cfg.round_retries}")
    _require(cfg.torch_threads >= 0, "torch_threads", f"must be >= 0, got {cfg.torch_threads}")
    _require(cfg.topology.degree > 0, "topology.degree", "must be > 0")
    _require(cfg.topology.radius > 0, "topology.radius", "must be > 0")
    for key in ("dataset.max_samples", "dataset.subsample"):
        value = OmegaConf.select(cfg, key)
        _require(value >= 0, key, f"must be >= 0 (0 = all), got {value}")
    _require(
        0 < cfg.dataset.label_fraction <= 1,
        "dataset.label_fraction",
        f"must be in (0, 1], got {cfg.dataset.label_fraction}",
    )


INTERPOLATION = "${"
STATE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def refuse_interpolation(raw: Any, path: str = "") -> None:
    """Refuse `${...}` anywhere in a config: an interpolation would be resolved on the machine
    that reads it (its environment variables, its files), not where the config was written."""
    if isinstance(raw, DictConfig) or OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw, resolve=False)
    if isinstance(raw, dict):
        for key, value in raw.items():
            refuse_interpolation(value, f"{path}.{key}" if path else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            refuse_interpolation(value, f"{path}[{i}]")
    elif isinstance(raw, str) and INTERPOLATION in raw:
        raise ConfigError(f"config key '{path}': interpolations ('${{...}}') are refused")


def to_structured(raw: DictConfig | dict[str, Any]) -> DictConfig:
    """Merge a raw config into the typed schema, then validate it (interpolations refused)."""
    refuse_interpolation(raw)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(NMoEConfig), raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from err
    assert isinstance(cfg, DictConfig)
    if ALL_BASELINES in cfg.baselines:
        cfg.baselines = list(BASELINES)
    validate(cfg)
    return cfg


def parse_overrides(text: str) -> list[str]:
    """Split a Hydra override string (`"gate=rangate fe.rounds=2"`) into a list."""
    return shlex.split(text or "")


SCHEMA_NAME = "nmoe_schema"


def register_schema() -> None:
    """Store the typed schema in Hydra's ConfigStore; `conf/config.yaml` lists it first in its
    defaults, so every key of every group can be overridden and is type-checked by Hydra."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=NMoEConfig)


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/` with Hydra overrides and return the validated config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    for override in overrides or []:
        if INTERPOLATION in override:
            key = override.split("=", 1)[0]
            raise ConfigError(f"config key '{key}': interpolations ('${{...}}') are refused")
    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            raw = compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        cause = _omegaconf_cause(err)
        if cause is not None:  # a value of the wrong type: name the key
            raise ConfigError(f"config key '{cause.full_key}': {cause.msg}") from err
        raise ConfigError(f"invalid override in {overrides}: {err}") from err
    OmegaConf.set_struct(raw, False)
    raw.pop("hydra", None)
    return to_structured(raw)


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error (with its `full_key`) behind a Hydra composition error, if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict copy of a config (for results.json)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out
