"""One client as a handler sees it: the run's config, its personal state, its data and the
torch modules built from them."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, Context
from omegaconf import DictConfig, OmegaConf

from nmoe import gates
from nmoe.augment import Augment, ssl_augmentation
from nmoe.config import to_structured
from nmoe.data import (
    SEED_EXPERT_SPLIT,
    ClientData,
    client_seed,
    federation_spec,
    holdout_split,
    labelled,
    load_client_data,
)
from nmoe.datasets import DatasetInfo, dataset_info
from nmoe.device_data import load_device_data
from nmoe.inbox import Inbox
from nmoe.models import (
    ExtractorBundle,
    MeanOfProbabilities,
    build_bundle,
    build_expert,
    load_numpy,
    stage1_keys,
)
from nmoe.pipeline import PriorShift
from nmoe.routing import (
    familiarity_radius,
    familiarity_ratios,
    local_first_mask,
    outside_own_classes,
)
from nmoe.training import forward_batched
from nmoe_protocol import messages as wire
from nmoe_protocol.sealing import (
    Ephemeral,
    KeyPins,
    generate_keypair,
    load_or_create_keypair,
    open_sealed,
    payload_aad,
    seal,
)

from .policy import NodePolicy
from .state import PersonalState

DATA_CACHE_DIR = (
    "data-cache"  # under the node's state-dir: this device's split, kept between messages
)
FE_GROUP, EXPERT_GROUP, LOCAL_HEAD_GROUP = wire.FE_STATE, wire.EXPERT_STATE, wire.LOCAL_HEAD_STATE
SHARED_EXPERT_GROUP, OWN_HEAD_GROUP, FEDAVG_GROUP = (
    "model/shared_expert",
    "model/own_head",
    "model/fedavg",
)
GATE_CACHE = "scratch/cache"
PRIVATE_KEY_GROUP, PINS_GROUP = "keys/private", "keys/pins"
gate_group = wire.gate_state


@lru_cache(maxsize=4)
def parsed_config(config_json: str) -> DictConfig:
    """The run config of a JSON string, validated and parsed once per process (read-only)."""
    cfg = to_structured(json.loads(config_json))
    OmegaConf.set_readonly(cfg, True)
    return cfg


@dataclass
class Node:
    """Everything a handler needs about this client for the current message."""

    cfg: DictConfig
    state: PersonalState
    data: ClientData
    num_classes: int
    policy: NodePolicy
    dataset: DatasetInfo
    data_source: (
        str  # "partition" (a slice of the configured dataset) or "data-dir" (the device's own)
    )
    # id(F) -> (F, its expert-training features, familiarity radius): computed once per message
    _own_features: dict[int, tuple] = field(default_factory=dict, init=False, repr=False)

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
        """A seed distinct per (run seed, client, purpose, round)."""
        return client_seed(int(self.cfg.seed), self.pid, *parts)

    # --- modules from the personal state -------------------------------------------------
    def bundle(
        self, arrays: dict[str, np.ndarray] | None = None, method: str | None = None
    ) -> ExtractorBundle:
        """The seeded stage-1 bundle with `arrays` loaded: every key, or exactly the keys
        stage-1 `method` trains."""
        bundle = build_bundle(
            self.cfg.model, self.image_shape, self.num_classes, int(self.cfg.seed)
        )
        if arrays is not None:
            expected = None if method is None else stage1_keys(bundle, method)
            load_numpy(bundle, arrays, expected=expected)
        return bundle

    def installed_bundle(self) -> ExtractorBundle:
        """The bundle with the installed F (and whatever else stage 1 trained) loaded."""
        bundle = self.bundle()
        load_numpy(bundle, self.state.get(FE_GROUP), strict=False)
        return bundle

    def expert(self, group: str = EXPERT_GROUP) -> torch.nn.Module:
        expert = build_expert(self.cfg.model, self.num_classes, self.seed())
        load_numpy(expert, self.state.get(group))
        return expert

    def prior_shift(self, gate: gates.Gate) -> PriorShift | None:
        """The blend `gate` asks this device to apply in wave 3 (`Gate.prior_shift`), from the
        labels of its own expert's training images; None: no blend."""
        return gate.prior_shift(
            self.cfg.gate, self.own_labels(), self.num_classes, self.shared_expert_id
        )

    def own_labels(self) -> torch.Tensor:
        """The labels of the images this device's own expert trains on: what its label prior is
        read from."""
        return self.split("expert")[1]

    def local_head(self) -> torch.nn.Module | None:
        """The head that answers this device's own local-first rows where `expert.local_head`
        trained one, else None (its expert does)."""
        held = self.state.get(LOCAL_HEAD_GROUP) if self.state.has(LOCAL_HEAD_GROUP) else None
        # the head's every key is loaded from `held`: a fresh bundle's head is the shape to fill
        return held_local_head(self.cfg, self.num_classes, held, lambda: self.bundle().head)

    def own_model(self) -> torch.nn.Module | None:
        """What answers this device's own rows (local-first) and its own share of each task
        (`expert.own_model`): its local head, or the mean of the head's and its expert's
        probabilities; None: its expert (no local head)."""
        head = self.local_head()
        if head is None or self.cfg.expert.own_model == "local_head":
            return head
        return MeanOfProbabilities(head, self.expert())

    def extractor(self) -> torch.nn.Module:
        """The installed F, built once per call: reuse it for several batches."""
        return self.installed_bundle().fe

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return forward_batched(self.extractor(), x)

    def local_experts(self) -> dict[int, torch.nn.Module]:
        """The experts this device holds (see `held_experts`)."""
        return held_experts(
            self.cfg,
            self.num_classes,
            self.pid,
            self.shared_expert_id,
            self.state.get,
            lambda: self.installed_bundle().head,
        )

    def local_rows(
        self,
        feats: torch.Tensor,
        own_feats: torch.Tensor,
        quantile: float,
        own_spread: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """bool (B,): the rows local-first answers with the own expert alone (`quantile`, already
        raised to the owner's `min-local-first` floor): familiar to the own training features and,
        with `gate.local_first_class_confidence`, not of a class the own expert barely trained on
        (stage 1's head is sure of it); rows within the floor always stay. `own_spread`: see
        `local_first_mask`."""
        g = self.cfg.gate
        outside = None
        if float(g.local_first_class_confidence) > 0:
            outside = outside_own_classes(
                forward_batched(self.installed_bundle().head, feats),
                self.split("expert")[1],
                float(g.local_first_class_confidence),
                int(g.local_first_class_min),
            )
        floor = float(self.policy.min_local_first)
        return local_first_mask(feats, own_feats, quantile, outside, floor, own_spread)

    def familiarity(self, fe: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """(B,) this node's familiarity with each feature row: the nearest feature of its
        expert's training images over its familiarity radius (`gate.know_quantile`)."""
        if id(fe) not in self._own_features:  # once per message, whatever the batches
            x, _ = self.split("expert")
            own = forward_batched(fe, x)
            quantile = float(self.cfg.gate.know_quantile)
            self._own_features[id(fe)] = (fe, own, familiarity_radius(own, quantile))
        _, own, radius = self._own_features[id(fe)]
        return familiarity_ratios(feats, own, radius)

    # --- sealing ---------------------------------------------------------------------
    @cached_property
    def key(self) -> X25519PrivateKey:
        """This node's private key, read once per message."""
        return self.private_key()

    def private_key(self) -> X25519PrivateKey:
        """This node's X25519 key: a 0600 file in its state-dir, else (a simulated node
        without one) kept in its context state for the run."""
        if self.state.state_dir is not None:
            return load_or_create_keypair(self.state.state_dir)[0]
        if not self.state.has(PRIVATE_KEY_GROUP):
            private, _ = generate_keypair()
            raw = np.frombuffer(private.private_bytes_raw(), np.uint8).copy()
            self.state.state[PRIVATE_KEY_GROUP] = ArrayRecord({"x25519": Array(raw)})
        raw = bytes(self.state.get(PRIVATE_KEY_GROUP)["x25519"])
        return X25519PrivateKey.from_private_bytes(raw)

    def pins(self) -> KeyPins:
        """The peers' public keys pinned for the run (`train.install part=peer_keys`): from
        `context.state`, else (a restarted node) from the pins file in its state-dir."""
        cached = self.__dict__.get("_pins")
        if cached is not None:
            return cached
        if self.state.has(PINS_GROUP):
            pins = KeyPins({int(k): bytes(v) for k, v in self.state.get(PINS_GROUP).items()})
        else:
            pins = KeyPins(self.state.read_pins())
            if pins.to_dict():
                self._keep_pins(pins)
        self.__dict__["_pins"] = pins
        return pins

    def pin(self, keys: dict[str, np.ndarray]) -> None:
        """Pin peers' keys for the run: every key checked against what is pinned (a changed
        key is refused, nothing changes), then saved to disk (atomically) and kept in memory."""
        pins = KeyPins(self.pins().to_dict())
        for pid, key in keys.items():
            if not pid.isdigit() or not 0 <= int(pid) < self.num_partitions:
                raise ValueError(f"a public key for partition {pid!r}, outside the federation")
            pins.pin(int(pid), bytes(np.asarray(key, np.uint8)))
        self.state.write_pins({int(pid): key for pid, key in pins.to_dict().items()})
        self._keep_pins(pins)
        self.__dict__["_pins"] = pins

    def _keep_pins(self, pins: KeyPins) -> None:
        arrays = {k: np.frombuffer(v, np.uint8).copy() for k, v in pins.to_dict().items()}
        self.state.state[PINS_GROUP] = ArrayRecord({k: Array(v) for k, v in arrays.items()})

    @cached_property
    def ephemeral(self) -> Ephemeral:
        """The ephemeral key pair of the payloads this message seals (one per message)."""
        return Ephemeral()

    def seal(self, peer: int, array: np.ndarray, query: str, wave: str) -> np.ndarray:
        """`array` sealed for `peer` (sender: this node), bound to the query and the wave."""
        aad = payload_aad(query, wave, self.pid, peer)
        return seal(array, self.key, self.pins()[peer], aad, ephemeral=self.ephemeral)

    def open(self, peer: int, blob: np.ndarray, query: str, wave: str, max_rows: int) -> np.ndarray:
        """A payload `peer` sealed for this node (authenticated; `SealError` otherwise)."""
        aad = payload_aad(query, wave, peer, self.pid)
        return open_sealed(blob, self.key, self.pins()[peer], aad, max_rows=max_rows)

    def gate_params(self, name: str) -> dict[str, np.ndarray]:
        """The gate's parameters on this node (its initial ones before any training)."""
        group = gate_group(name)
        if self.state.has(group):
            return self.state.get(group)
        return gates.get(name).initial_params(self.cfg.model, self.num_experts, int(self.cfg.seed))

    def inbox(self) -> Inbox:
        """The device's inbox and outbox (node config `inbox-dir`, `outbox-dir`; default
        `inbox/` and `outbox/` in the state-dir)."""
        config = self.state.context.node_config
        root = self.state.state_dir
        inbox, outbox = config.get("inbox-dir"), config.get("outbox-dir")
        if not inbox and root is None:
            raise ValueError("this node has no inbox (node config inbox-dir or state-dir)")
        inbox_dir = Path(str(inbox)) if inbox else root / "inbox"
        outbox_dir = Path(str(outbox)) if outbox else root / "outbox"
        return Inbox(inbox_dir, outbox_dir, self.dataset)

    # --- data ----------------------------------------------------------------------
    def labelled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images that carry a label (`dataset.label_fraction`), with their labels."""
        return labelled(self.data)

    def stage1_data(self, method: str) -> tuple[torch.Tensor, ...]:
        """Stage 1's training and validation parts, each (images, labels, labelled mask): FedCE
        uses the labelled images only; FedSC and hybrid every image, with the mask saying which
        carry a label (CE reads only those; on a device the others' label is -1). With
        `fe.patience` a `fe.val_fraction` part is held out (the same every round) for the
        convergence rule, else the validation part is empty."""
        d = self.data
        if method == "fedce":
            x, y = self.labelled_train()
            mask = torch.ones(len(y), dtype=torch.bool)
        else:
            x, y, mask = d.train_x, d.train_y, d.train_labelled
        if int(self.cfg.fe.patience) == 0 or len(y) < 2:
            return x, y, mask, x[:0], y[:0], mask[:0]
        generator = torch.Generator().manual_seed(self.seed(11))
        order = torch.randperm(len(y), generator=generator)
        held = max(1, int(len(y) * float(self.cfg.fe.val_fraction)))
        train, val = order[held:], order[:held]
        return x[train], y[train], mask[train], x[val], y[val], mask[val]

    def augmentation(self) -> Augment:
        """The run's two-view augmentation for this dataset (policy and background fill of
        `nmoe/augment.py`, scaled by `fe.augment_strength`)."""
        info = self.dataset
        return ssl_augmentation(
            info.name,
            self.image_shape,
            info.background,
            strength=float(self.cfg.fe.augment_strength),
            mean=info.mean,
            std=info.std,
        )

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`expert` / `gate`: the labelled training data divided by `expert.gate_holdout_fraction`
        (the gate learns on samples the own expert never saw); `train` (labelled), `test`,
        `global` (an error on a node that holds no global test set)."""
        d = self.data
        if name in ("expert", "gate", "train"):
            x, y = self.labelled_train()
            if name == "train":
                return x, y
            fraction = float(self.cfg.expert.gate_holdout_fraction)
            expert, gate = holdout_split(x, y, fraction, self.seed(SEED_EXPERT_SPLIT))
            return expert if name == "expert" else gate
        if name == "global" and not d.has_global:
            raise ValueError("this node holds no global test set")
        splits = {"test": (d.test_x, d.test_y), "global": (d.global_x, d.global_y)}
        if name not in splits:
            raise ValueError(f"unknown split '{name}'")
        return splits[name]

    def reachable(self, neighbours: list[int]) -> torch.Tensor:
        """(E,) mask of the experts this client may route to: its neighbours and the shared one."""
        if self.pid not in neighbours:
            raise ValueError(
                f"neighbours {neighbours} must include the requester itself ({self.pid})"
            )
        if any(not 0 <= i < self.num_partitions for i in neighbours):
            raise ValueError(f"neighbour ids {neighbours} outside [0, {self.num_partitions})")
        mask = torch.zeros(self.num_experts, dtype=torch.bool)
        mask[neighbours] = True
        if self.shared_expert_id is not None:
            mask[self.shared_expert_id] = True
        return mask


def held_experts(
    cfg: DictConfig,
    num_classes: int,
    pid: int,
    shared_id: int | None,
    read_group: Callable[[str], dict[str, np.ndarray]],
    stage1_head: Callable[[], torch.nn.Module],
) -> dict[int, torch.nn.Module]:
    """Expert id -> module for the experts a device holds, from its personal state groups: its
    own expert and, if any, the shared slot (H_0, or with `expert.shared_model=stage1` the
    installed stage-1 head on F's features). The ClientApp and the benchmarks build them here."""
    own = build_expert(cfg.model, num_classes, 0)
    load_numpy(own, read_group(EXPERT_GROUP))
    local = {pid: own}
    if shared_id is not None and cfg.expert.shared_model == "stage1":
        local[shared_id] = stage1_head()
    elif shared_id is not None:
        local[shared_id] = build_expert(cfg.model, num_classes, 0)
        load_numpy(local[shared_id], read_group(SHARED_EXPERT_GROUP))
    return local


def held_local_head(
    cfg: DictConfig,
    num_classes: int,
    arrays: dict[str, np.ndarray] | None,
    stage1_head: Callable[[], torch.nn.Module],
) -> torch.nn.Module | None:
    """The local head (`expert.local_head`) a device holds, from its `LOCAL_HEAD_GROUP` arrays
    (None where it holds none: its expert answers its local-first rows), in the shape of what it
    was fine-tuned from (`expert.local_head_init`: H_0, or stage 1's head, built by
    `stage1_head`). The ClientApp and the benchmarks build it here."""
    if arrays is None:
        return None
    if cfg.expert.get("local_head_init", "shared_expert") == "stage1":
        head = copy.deepcopy(stage1_head())  # never the module that fills the shared slot
    else:
        head = build_expert(cfg.model, num_classes, 0)
    load_numpy(head, arrays)
    return head


def open_node(context: Context, config_json: str | None = None) -> Node:
    """This client for the current message: its owner's policy, its run config (set now if
    `config_json` is given and both the policy and the node's data admit it, else the one kept
    since `query.setup`), personal state and data. A refused config changes nothing."""
    policy = NodePolicy.from_node_config(dict(context.node_config))
    state = PersonalState(context)
    cfg = parsed_config(config_json if config_json is not None else state.config_json())
    if config_json is not None:
        policy.admit(cfg)
    threads = policy.threads(int(cfg.torch_threads))
    if threads > 0:
        torch.set_num_threads(threads)
    data_dir = context.node_config.get("data-dir")
    info = dataset_info(str(cfg.dataset.name))
    if data_dir:
        data, classes = device_data(str(data_dir), cfg)
    else:
        cache = state.state_dir / DATA_CACHE_DIR if state.state_dir is not None else None
        spec = federation_spec(cfg)
        data, classes = load_client_data(spec, state.partition_id, state.num_partitions, cache)
    if config_json is not None:
        state.set_config(config_json)
    return Node(cfg, state, data, classes, policy, info, "data-dir" if data_dir else "partition")


def device_data(data_dir: str, cfg: DictConfig) -> tuple[ClientData, int]:
    """The device's own samples from its `data-dir`, checked against the run's dataset."""
    data, info = _read_device_data(data_dir, float(cfg.dataset.local_test_fraction), int(cfg.seed))
    expected = dataset_info(str(cfg.dataset.name))
    if (info.name, info.image_shape, info.num_classes) != (
        expected.name,
        expected.image_shape,
        expected.num_classes,
    ):
        raise ValueError(
            f"this device holds {info.name} {list(info.image_shape)} with {info.num_classes} "
            f"classes; the run is configured for {expected.name} {list(expected.image_shape)} "
            f"with {expected.num_classes}"
        )
    return data, info.num_classes


@lru_cache(maxsize=2)
def _read_device_data(data_dir: str, local_test_fraction: float, seed: int) -> tuple:
    """Read once per process (a warm executor serves many messages)."""
    return load_device_data(Path(data_dir), local_test_fraction, seed)
