"""Datasets, partitions and client splits (plain torch + Flower Datasets partitioners).

The whole federation is built deterministically from `(dataset, partition, seed,
num_partitions)`, so every process (each client, the server's centralized
reference) derives the same split without any data crossing the network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_npz_atomic
from .datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    DIGITS_MAX_INTENSITY,
    DatasetInfo,
    DatasetIntegrityError,
    DatasetUnavailableError,
    RawImages,
    dataset_info,
    normalise,
    read_cifar10_folder,
    read_cifar10_hf,
    read_dataset,
    read_digits,
    read_fashion_mnist,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "DIGITS_MAX_INTENSITY",
    "SUBSAMPLE_SEED",
    "ArrayDataset",
    "ClientData",
    "DatasetInfo",
    "DatasetIntegrityError",
    "DatasetUnavailableError",
    "balanced_holdout",
    "dataset_info",
    "federation_spec",
    "label_mask",
    "labelled",
    "load_all_clients",
    "load_arrays",
    "load_client_data",
    "make_partitioner",
    "num_classes",
    "spec_dataset_info",
    "stratified_subsample",
]

# Seed of `dataset.subsample`: fixed, independent of the run seed, so every method and every run
# seed sees the same images.
SUBSAMPLE_SEED = 20_240_917
# Mixed with the run seed and the partition id to choose each client's labelled images.
LABEL_SEED_SALT = 7_349
# Part of the split-cache key: bump it when the cached layout changes.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test split, plus the shared global test set.

    `train_labelled[i]` says whether training image i has a label the client may use
    (`dataset.label_fraction`). In simulation `train_y` still holds every true label; on a device
    unlabelled images have label -1. Supervised code must use only `labelled(client)`.
    `global_x`/`global_y` have 0 rows when the device holds no global test set (`has_global`).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    global_x: torch.Tensor
    global_y: torch.Tensor
    train_labelled: torch.Tensor = field(default=None)  # type: ignore[assignment]  # None: all

    def __post_init__(self) -> None:
        if self.train_labelled is None:
            object.__setattr__(
                self, "train_labelled", torch.ones(len(self.train_y), dtype=torch.bool)
            )

    @property
    def has_global(self) -> bool:
        return len(self.global_y) > 0


CLIENT_DATA_FIELDS = tuple(ClientData.__dataclass_fields__)


SEED_PRIME_RUN, SEED_PRIME_CLIENT, SEED_PRIME_PART = 1_000_003, 7919, 104_729
SEED_EXPERT_SPLIT = 10  # the purpose term of the expert / gate split's seed


def client_seed(run_seed: int, partition_id: int, *parts: int) -> int:
    """A seed distinct per (run seed, client, purpose, round): primes keep the terms apart."""
    return (
        run_seed * SEED_PRIME_RUN
        + partition_id * SEED_PRIME_CLIENT
        + sum(p * SEED_PRIME_PART ** (i + 1) for i, p in enumerate(parts))
    )


def holdout_split(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(expert part, gate part): `fraction` of (x, y), chosen by `seed`, held out of the expert's
    training for the gate (which must learn on samples the expert never saw)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    held = int(len(order) * fraction)
    gate = order[:held] if held else order
    return (x[order[held:]], y[order[held:]]), (x[gate], y[gate])


def labelled(client: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's training images that carry a label, with their labels."""
    mask = client.train_labelled
    return client.train_x[mask], client.train_y[mask]


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset as arrays: images (N, C, H, W) float32, labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int


def _normalised(raw: RawImages) -> ArrayDataset:
    images = normalise(raw.images, raw.info.mean, raw.info.std, raw.pixel_max)
    return ArrayDataset(images, raw.labels, raw.info.num_classes)


def load_digits_arrays() -> ArrayDataset:
    """scikit-learn's digits, normalised with the fixed digits constants, (1797, 1, 8, 8)."""
    return _normalised(read_digits())


def load_fashion_mnist_arrays(path: str | None = None, hf_name: str | None = None) -> ArrayDataset:
    """Fashion-MNIST (70,000 images, train then test), normalised, (N, 1, 28, 28)."""
    return _normalised(read_fashion_mnist(path, hf_name))


def load_cifar10_folder(path: str, verify_checksums: bool = True) -> ArrayDataset:
    """CIFAR-10 from torchvision's on-disk format (`cifar-10-batches-py`), no download, no
    arbitrary unpickling (see `nmoe.datasets.load_cifar_batch`)."""
    return _normalised(read_cifar10_folder(path, verify_checksums))


def load_cifar10_hf(hf_name: str) -> ArrayDataset:
    """CIFAR-10 from the HF cache (offline)."""
    return _normalised(read_cifar10_hf(hf_name))


def stratified_subsample(labels: np.ndarray, size: int, seed: int = SUBSAMPLE_SEED) -> np.ndarray:
    """Sorted indices of a class-stratified random subsample of `size` items (all if `size` is
    0 or at least the number of items)."""
    if size <= 0 or size >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    try:
        chosen, _ = train_test_split(
            np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed
        )
    except ValueError as err:
        raise ValueError(f"dataset.subsample={size}: {err}") from err
    return np.sort(chosen)


def load_arrays(dataset_cfg: Any) -> ArrayDataset:
    """Load the configured dataset as normalised arrays: `max_samples` keeps the first images,
    then `subsample` draws a class-stratified subsample with the fixed `SUBSAMPLE_SEED`."""
    raw = read_dataset(dataset_cfg)
    max_samples = int(getattr(dataset_cfg, "max_samples", 0) or 0)
    if max_samples:
        raw = raw.select(np.arange(min(max_samples, len(raw.labels))))
    subsample = int(getattr(dataset_cfg, "subsample", 0) or 0)
    if subsample:
        raw = raw.select(stratified_subsample(raw.labels, subsample))
    return _normalised(raw)


def balanced_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced held-out set (same count per class) and of the rest."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, int(counts.min() * fraction))
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    )
    rest = np.setdiff1d(np.arange(len(labels)), held)
    return np.sort(held), rest


def make_partitioner(partition_cfg: Any, num_partitions: int, seed: int):
    """The Flower Datasets partitioner for the configured scheme."""
    # imported here: a deployed ClientApp with a cached split (load_client_data) never needs it
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if partition_cfg.kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partition_cfg.kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partition_cfg.alpha),
            min_partition_size=int(partition_cfg.min_partition_size),
            self_balancing=False,
            seed=seed,
        )
    if partition_cfg.kind == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(partition_cfg.classes_per_client),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    raise ValueError(f"unknown partition kind '{partition_cfg.kind}'")


def _tensors(data: ArrayDataset, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.images[index]), torch.from_numpy(data.labels[index])


@lru_cache(maxsize=4)
def _federation(
    spec_json: str, num_partitions: int
) -> tuple[ArrayDataset, tuple[dict[str, np.ndarray], ...], np.ndarray]:
    spec = json.loads(spec_json)
    dataset_cfg = _Namespace(spec["dataset"])
    partition_cfg = _Namespace(spec["partition"])
    seed = int(spec["seed"])
    data = load_arrays(dataset_cfg)
    global_idx, pool_idx = balanced_holdout(data.labels, dataset_cfg.global_test_fraction, seed)
    from datasets import Dataset

    pool = Dataset.from_dict({"index": pool_idx, "label": data.labels[pool_idx]})
    partitioner = make_partitioner(partition_cfg, num_partitions, seed)
    partitioner.dataset = pool
    splits = []
    for pid in range(num_partitions):
        part = partitioner.load_partition(pid)
        if len(part) < 2:
            raise ValueError(
                f"partition {pid} holds {len(part)} samples: too few for a train/test split "
                "(use fewer clients, a larger partition.alpha or partition.min_partition_size)"
            )
        local = part.train_test_split(test_size=dataset_cfg.local_test_fraction, seed=seed)
        splits.append(
            {
                "train": np.asarray(local["train"]["index"], np.int64),
                "test": np.asarray(local["test"]["index"], np.int64),
            }
        )
    return data, tuple(splits), global_idx


class _Namespace:
    """Attribute access to a plain dict (keeps this module free of OmegaConf)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def federation_spec(cfg: Any) -> str:
    """The part of the config that fixes the data split, as a hashable JSON key."""
    from omegaconf import OmegaConf

    def plain(node: Any) -> Any:
        return (
            OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        )

    return json.dumps(
        {
            "dataset": plain(cfg["dataset"]),
            "partition": plain(cfg["partition"]),
            "seed": int(cfg["seed"]),
        },
        sort_keys=True,
    )


def label_mask(num_train: int, fraction: float, seed: int, partition_id: int) -> np.ndarray:
    """Which of a client's `num_train` training images keep their label: a random
    `round(fraction * num_train)` of them (at least one), seeded by run seed and partition id."""
    if fraction >= 1.0 or num_train == 0:
        return np.ones(num_train, dtype=bool)
    count = max(1, round(fraction * num_train))
    rng = np.random.default_rng([LABEL_SEED_SALT, seed, partition_id])
    mask = np.zeros(num_train, dtype=bool)
    mask[rng.choice(num_train, size=count, replace=False)] = True
    return mask


def _read_cached(cached: Path) -> tuple[ClientData, int] | None:
    try:
        with np.load(cached, allow_pickle=False) as npz:
            tensors = {name: torch.from_numpy(npz[name]) for name in CLIENT_DATA_FIELDS}
            return ClientData(**tensors), int(npz["num_classes"])
    except (KeyError, ValueError, OSError):  # an older layout or a damaged file: rebuild it
        return None


def load_client_data(
    spec_json: str, partition_id: int, num_partitions: int, cache_dir: Path | None = None
) -> tuple[ClientData, int]:
    """Client `partition_id`'s local train/test split, the global test set, and the number of
    classes. With `cache_dir` the split is kept there as `.npz` (written atomically, keyed by
    the data config), so the next process on this device skips loading and partitioning."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    key = hashlib.sha256(f"{spec_json}|{num_partitions}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    cached = (
        cache_dir / f"split-{key}-partition-{partition_id}.npz" if cache_dir is not None else None
    )
    if cached is not None and cached.is_file():
        hit = _read_cached(cached)
        if hit is not None:
            return hit
    spec = json.loads(spec_json)
    data, splits, global_idx = _federation(spec_json, num_partitions)
    train_x, train_y = _tensors(data, splits[partition_id]["train"])
    test_x, test_y = _tensors(data, splits[partition_id]["test"])
    global_x, global_y = _tensors(data, global_idx)
    fraction = float(spec["dataset"].get("label_fraction", 1.0))
    mask = label_mask(len(train_y), fraction, int(spec["seed"]), partition_id)
    client = ClientData(
        train_x, train_y, test_x, test_y, global_x, global_y, torch.from_numpy(mask)
    )
    if cached is not None:
        arrays = {name: getattr(client, name).numpy() for name in CLIENT_DATA_FIELDS}
        write_npz_atomic(cached, {**arrays, "num_classes": np.array(data.num_classes)})
    return client, data.num_classes


def load_all_clients(spec_json: str, num_partitions: int) -> list[ClientData]:
    """Every client's data (for the centralized reference and the local-only baseline)."""
    return [load_client_data(spec_json, pid, num_partitions)[0] for pid in range(num_partitions)]


def spec_dataset_info(spec_json: str) -> DatasetInfo:
    """The registry facts (shape, classes, normalisation) of a spec's dataset, loading nothing."""
    return dataset_info(json.loads(spec_json)["dataset"]["name"])


def num_classes(spec_json: str, num_partitions: int) -> int:
    """Number of classes of the configured dataset (from the registry: loads nothing)."""
    del num_partitions  # kept for callers; the registry does not need it
    return spec_dataset_info(spec_json).num_classes
