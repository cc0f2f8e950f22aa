"""Datasets, partitions and client splits (plain torch + Flower Datasets partitioners).

The whole federation is built deterministically from `(dataset, partition, seed,
num_partitions)`, so every process (each client, the server's centralized
reference) derives the same split without any data crossing the network.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_npz_atomic

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MAX_INTENSITY = 16.0


class DatasetUnavailableError(RuntimeError):
    """The configured dataset cannot be found locally."""


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test split, plus the shared global test set."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    global_x: torch.Tensor
    global_y: torch.Tensor


CLIENT_DATA_FIELDS = tuple(ClientData.__dataclass_fields__)


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset as arrays: images (N, C, H, W) float32, labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int


def load_digits_arrays() -> ArrayDataset:
    """scikit-learn's digits, standardised (zero mean, unit variance), shape (1797, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / DIGITS_MAX_INTENSITY).astype(np.float32)[:, None, :, :]
    images = (images - images.mean()) / images.std()
    return ArrayDataset(images, bunch.target.astype(np.int64), 10)


def _normalise_cifar(images_uint8: np.ndarray) -> np.ndarray:
    images = images_uint8.astype(np.float32) / 255.0  # (N, H, W, C)
    images = (images - np.array(CIFAR10_MEAN, np.float32)) / np.array(CIFAR10_STD, np.float32)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def load_cifar10_folder(path: str) -> ArrayDataset:
    """CIFAR-10 from torchvision's on-disk format (`cifar-10-batches-py`), no download."""
    root = Path(path).expanduser()
    batch_dir = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    files = [batch_dir / f"data_batch_{i}" for i in range(1, 6)] + [batch_dir / "test_batch"]
    present = [f for f in files if f.is_file()]
    if not present:
        raise DatasetUnavailableError(
            f"no CIFAR-10 batches under '{root}': expected torchvision's "
            "'cifar-10-batches-py/data_batch_1..5, test_batch'. Fix: set dataset.path to the folder "
            "that holds cifar-10-batches-py (e.g. from torchvision.datasets.CIFAR10(root, download=True)), "
            "or leave dataset.path unset to load dataset.hf_name from the HF cache"
        )
    images, labels = [], []
    for file in present:
        with file.open("rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images.append(
            np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        labels.append(np.asarray(entry["labels"], np.int64))
    return ArrayDataset(_normalise_cifar(np.concatenate(images)), np.concatenate(labels), 10)


def load_cifar10_hf(hf_name: str) -> ArrayDataset:
    """CIFAR-10 through HF `datasets` (needs the network or a filled HF cache)."""
    from datasets import concatenate_datasets, load_dataset

    try:
        parts = load_dataset(hf_name)
    except Exception as err:  # datasets raises many kinds when offline
        raise DatasetUnavailableError(
            f"CIFAR-10 is not available: '{hf_name}' could not be loaded ({type(err).__name__}). "
            "Fix: set dataset.path=/dir/with/cifar-10-batches-py (torchvision format), "
            "or run once with network access so the HF cache holds it."
        ) from err
    merged = concatenate_datasets([parts[name] for name in parts])
    image_col = "img" if "img" in merged.column_names else "image"
    images = np.stack([np.asarray(img, np.uint8) for img in merged[image_col]])
    return ArrayDataset(_normalise_cifar(images), np.asarray(merged["label"], np.int64), 10)


def load_arrays(dataset_cfg: Any) -> ArrayDataset:
    """Load the configured dataset as arrays."""
    if dataset_cfg.name == "digits":
        data = load_digits_arrays()
    elif dataset_cfg.name == "cifar10":
        data = (
            load_cifar10_folder(dataset_cfg.path)
            if dataset_cfg.path
            else load_cifar10_hf(dataset_cfg.hf_name)
        )
    else:
        raise DatasetUnavailableError(f"unknown dataset '{dataset_cfg.name}'")
    if dataset_cfg.max_samples:
        data = ArrayDataset(
            data.images[: dataset_cfg.max_samples],
            data.labels[: dataset_cfg.max_samples],
            data.num_classes,
        )
    return data


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


def load_client_data(
    spec_json: str, partition_id: int, num_partitions: int, cache_dir: Path | None = None
) -> tuple[ClientData, int]:
    """Client `partition_id`'s local train/test split, the global test set, and the number of
    classes. With `cache_dir` the split is kept there as `.npz` (written atomically, keyed by
    the data config), so the next process on this device skips loading and partitioning."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    key = hashlib.sha256(f"{spec_json}|{num_partitions}".encode()).hexdigest()[:16]
    cached = (
        cache_dir / f"split-{key}-partition-{partition_id}.npz" if cache_dir is not None else None
    )
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as npz:
            tensors = {name: torch.from_numpy(npz[name]) for name in CLIENT_DATA_FIELDS}
            return ClientData(**tensors), int(npz["num_classes"])
    data, splits, global_idx = _federation(spec_json, num_partitions)
    train_x, train_y = _tensors(data, splits[partition_id]["train"])
    test_x, test_y = _tensors(data, splits[partition_id]["test"])
    global_x, global_y = _tensors(data, global_idx)
    client = ClientData(train_x, train_y, test_x, test_y, global_x, global_y)
    if cached is not None:
        arrays = {name: getattr(client, name).numpy() for name in CLIENT_DATA_FIELDS}
        write_npz_atomic(cached, {**arrays, "num_classes": np.array(data.num_classes)})
    return client, data.num_classes


def load_all_clients(spec_json: str, num_partitions: int) -> list[ClientData]:
    """Every client's data (for the centralized reference and the local-only baseline)."""
    return [load_client_data(spec_json, pid, num_partitions)[0] for pid in range(num_partitions)]


def num_classes(spec_json: str, num_partitions: int) -> int:
    """Number of classes of the configured dataset."""
    return _federation(spec_json, num_partitions)[0].num_classes


def ssl_augmentation(image_shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Two-view augmentation suited to the image size: returns a per-sample transform."""
    from torchvision.transforms import (
        v2,
    )  # imported here: every deployed ClientApp message is a fresh process

    channels, height, _ = image_shape
    if channels == 3:
        transform = v2.Compose(
            [
                v2.RandomResizedCrop(height, scale=(0.2, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]
        )
    else:  # small grey digits: no flips (they change the digit), mild geometry + noise
        transform = v2.Compose(
            [
                v2.RandomResizedCrop(height, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomAffine(degrees=12, translate=(0.1, 0.1)),
                v2.GaussianNoise(mean=0.0, sigma=0.05, clip=False),
            ]
        )

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(img) for img in batch])

    return augment
