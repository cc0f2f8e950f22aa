"""The data layer: dataset sources (Fashion-MNIST three ways, CIFAR-10 without arbitrary
unpickling), the registry's fixed normalisation, subsampling, few-label clients, the device
data-dir format and the exporter. Every fixture is written here; nothing is downloaded and no
test needs the real datasets installed."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe import data as data_mod
from nmoe import datasets as ds
from nmoe.config import ConfigError, compose_config
from nmoe.data import (
    ClientData,
    DatasetIntegrityError,
    DatasetUnavailableError,
    federation_spec,
    label_mask,
    labelled,
    load_all_clients,
    load_arrays,
    load_client_data,
    load_fashion_mnist_arrays,
    num_classes,
    spec_dataset_info,
)
from nmoe.datasets import DATASETS, normalise
from nmoe.device_data import DeviceDataError, load_device_data, write_device_data
from scripts import export_device_data

FASHION = DATASETS["fashion_mnist"]
TRAIN_N, TEST_N = 30, 10


# ------------------------------------------------------------------------------ idx fixtures
def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte idx file (the MNIST format), gzip-compressed when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)
    return path


def fashion_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {
        split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
        for split, n in (("train", TRAIN_N), ("t10k", TEST_N))
    }


def write_fashion(folder: Path, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    """The four Fashion-MNIST idx files; returns all images (train then test) and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = fashion_arrays()
    for split, (images, labels) in arrays.items():
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    images = np.concatenate([arrays["train"][0], arrays["t10k"][0]])
    return images, np.concatenate([arrays["train"][1], arrays["t10k"][1]])


def expected_fashion(images: np.ndarray) -> np.ndarray:
    return ((images[:, None].astype(np.float32) / 255 - FASHION.mean[0]) / FASHION.std[0]).astype(
        np.float32
    )


@pytest.fixture
def no_system_datasets(monkeypatch, tmp_path):
    """No Debian package and an empty HF cache, whatever this machine has installed."""
    import datasets.config

    monkeypatch.setattr(ds, "SYSTEM_DATASET_DIRS", (tmp_path / "no-share",))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-hf-cache"))


def test_idx_reader_reads_gzip_and_plain_and_refuses_garbage(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        assert np.array_equal(ds.read_idx(write_idx(tmp_path / name, array)), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float idx
    with pytest.raises(DatasetIntegrityError, match="unsigned-byte idx"):
        ds.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # 5 said, 2 there
    with pytest.raises(DatasetIntegrityError, match="header says shape"):
        ds.read_idx(tmp_path / "short")


def test_fashion_mnist_from_torchvision_raw_folder(tmp_path: Path, no_system_datasets) -> None:
    images, labels = write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    expected = expected_fashion(images)
    # the raw folder, its parent and torchvision's root all work
    for path in (tmp_path / "FashionMNIST" / "raw", tmp_path / "FashionMNIST", tmp_path):
        data = load_fashion_mnist_arrays(str(path))
        assert data.images.shape == (TRAIN_N + TEST_N, 1, 28, 28) and data.num_classes == 10
        assert np.array_equal(data.images, expected) and np.array_equal(data.labels, labels)
    cfg = compose_config(["dataset=fashion_mnist", f"dataset.path={tmp_path}"])
    assert np.array_equal(load_arrays(cfg.dataset).images, expected)


def test_fashion_mnist_from_the_debian_package_dir(tmp_path: Path, monkeypatch) -> None:
    share = tmp_path / "share" / "datasets"
    images, labels = write_fashion(share / "fashion-mnist", gz=True)  # Debian ships .gz files
    monkeypatch.setattr(ds, "SYSTEM_DATASET_DIRS", (tmp_path / "nothing-here", share))
    data = load_arrays(compose_config(["dataset=fashion_mnist"]).dataset)
    assert np.array_equal(data.images, expected_fashion(images))
    assert np.array_equal(data.labels, labels)


def build_hf_cache(cache: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A real `datasets` cache entry for 'zalando-datasets/fashion_mnist', built from local parquet
    files (train = first TRAIN_N images, test = the rest), as `load_dataset` leaves it."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage
    from datasets.packaged_modules.parquet.parquet import Parquet
    from PIL import Image

    features = Features({"image": HFImage(), "label": ClassLabel(names=list(FASHION.class_names))})
    files = {}
    for split, rows in (("train", slice(0, TRAIN_N)), ("test", slice(TRAIN_N, None))):
        part = Dataset.from_dict(
            {
                "image": [Image.fromarray(img) for img in images[rows]],
                "label": labels[rows].tolist(),
            },
            features=features,
        )
        files[split] = str(cache.parent / f"{split}.parquet")
        part.to_parquet(files[split])
    with ds.hf_offline():
        builder = Parquet(
            cache_dir=str(cache),
            dataset_name="fashion_mnist",
            repo_id="zalando-datasets/fashion_mnist",
            hash="0123abcd",
            data_files=files,
            features=features,
        )
        builder.download_and_prepare()
    # load_dataset looks the entry up under its config name
    (entry,) = (cache / "zalando-datasets___fashion_mnist").iterdir()
    entry.rename(entry.parent / "default")


def test_fashion_mnist_from_the_hf_cache_offline(tmp_path: Path, monkeypatch) -> None:
    import datasets
    import datasets.config
    import huggingface_hub.constants

    arrays = fashion_arrays()
    images = np.concatenate([arrays["train"][0], arrays["t10k"][0]])
    labels = np.concatenate([arrays["train"][1], arrays["t10k"][1]])
    cache = tmp_path / "hf-cache"
    build_hf_cache(cache, images, labels)
    monkeypatch.setattr(ds, "SYSTEM_DATASET_DIRS", (tmp_path / "no-share",))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    offline_during_call = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        offline_during_call.append(
            (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
        )
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    data = load_arrays(compose_config(["dataset=fashion_mnist"]).dataset)
    assert np.array_equal(data.images, expected_fashion(images))  # train first, then test
    assert np.array_equal(data.labels, labels)
    assert offline_during_call == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False  # the switches are restored afterwards
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_missing_fashion_mnist_names_all_three_ways(tmp_path: Path, no_system_datasets) -> None:
    with pytest.raises(DatasetUnavailableError) as err:
        load_arrays(compose_config(["dataset=fashion_mnist"]).dataset)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "dataset.path" in message and "FashionMNIST/raw" in message
    assert "HF cache" in message and "zalando-datasets/fashion_mnist" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError, match=str(empty)) as err:
        load_arrays(compose_config(["dataset=fashion_mnist", f"dataset.path={empty}"]).dataset)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


# --------------------------------------------------------------------------- registry, constants
def test_registry_facts_and_fixed_normalisation(monkeypatch) -> None:
    assert set(DATASETS) == {"digits", "fashion_mnist", "cifar10"}
    for name, shape in (("digits", (1, 8, 8)), ("fashion_mnist", (1, 28, 28))):
        assert DATASETS[name].image_shape == shape and DATASETS[name].num_classes == 10
    assert DATASETS["cifar10"].image_shape == (3, 32, 32)
    assert DATASETS["cifar10"].class_names[0] == "airplane"
    for info in DATASETS.values():  # background = a blank (raw 0) pixel, normalised
        blank = np.zeros((1, *info.image_shape), np.uint8)
        np.testing.assert_allclose(
            normalise(blank, info.mean, info.std, info.pixel_max)[0, :, 0, 0],
            info.background,
            rtol=1e-6,
        )
    # the digits constants are the digits' own statistics: normalised digits have mean 0, std 1
    digits = load_arrays(compose_config([]).dataset)
    assert abs(float(digits.images.mean())) < 1e-4 and abs(float(digits.images.std()) - 1) < 1e-4
    # shapes and classes come from the registry, without loading any data
    monkeypatch.setattr(data_mod, "read_dataset", lambda cfg: pytest.fail("data was loaded"))
    spec = federation_spec(compose_config(["dataset=cifar10", "dataset.path=/nonexistent"]))
    assert num_classes(spec, 4) == 10 and spec_dataset_info(spec).image_shape == (3, 32, 32)


# --------------------------------------------------------------------------------- subsample
def image_keys(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images}


def all_images(clients: list[ClientData]) -> set[bytes]:
    keys = image_keys(clients[0].global_x)
    for c in clients:
        keys |= image_keys(c.train_x) | image_keys(c.test_x)
    return keys


def test_subsample_is_stratified_fixed_and_taken_before_the_split() -> None:
    full = load_arrays(compose_config([]).dataset)
    sub = load_arrays(compose_config(["dataset.subsample=500"]).dataset)
    assert len(sub.labels) == 500
    expected = np.bincount(full.labels) * 500 / len(full.labels)
    assert np.abs(np.bincount(sub.labels) - expected).max() <= 1  # class proportions kept
    # the same 500 images whatever the run seed; the split of them follows the seed
    seeded = [
        load_all_clients(federation_spec(compose_config(["dataset.subsample=500", f"seed={s}"])), 3)
        for s in (0, 1)
    ]
    assert (
        all_images(seeded[0]) == all_images(seeded[1]) == image_keys(torch.from_numpy(sub.images))
    )
    assert (
        sum(len(c.train_y) + len(c.test_y) for c in seeded[0]) + len(seeded[0][0].global_y) == 500
    )
    assert not torch.equal(seeded[0][0].train_y, seeded[1][0].train_y)
    capped = load_arrays(compose_config(["dataset.max_samples=300"]).dataset)
    assert np.array_equal(capped.images, full.images[:300])  # max_samples: the first N, as before
    with pytest.raises(ValueError, match=r"dataset\.subsample=5"):
        load_arrays(compose_config(["dataset.subsample=5"]).dataset)  # fewer than the classes


# -------------------------------------------------------------------------------- few labels
def test_label_fraction_marks_a_fixed_share_per_client(tmp_path: Path) -> None:
    spec = federation_spec(compose_config(["dataset.label_fraction=0.25", "partition=iid"]))
    clients = load_all_clients(spec, 4)
    for pid, client in enumerate(clients):
        n = len(client.train_y)
        assert client.train_labelled.dtype == torch.bool and len(client.train_labelled) == n
        assert int(client.train_labelled.sum()) == max(1, round(0.25 * n))
        x, y = labelled(client)
        assert torch.equal(x, client.train_x[client.train_labelled]) and len(y) == len(x)
        again, _ = load_client_data(spec, pid, 4)
        assert torch.equal(again.train_labelled, client.train_labelled)
    masks = [c.train_labelled for c in clients]
    other_seed = load_all_clients(
        federation_spec(compose_config(["dataset.label_fraction=0.25", "partition=iid", "seed=1"])),
        4,
    )
    assert any(not torch.equal(a, b.train_labelled) for a, b in zip(masks, other_seed, strict=True))
    # the device's split cache keeps the mask
    first, _ = load_client_data(spec, 2, 4, tmp_path)
    data_mod._federation.cache_clear()
    cached, _ = load_client_data(spec, 2, 4, tmp_path)
    assert data_mod._federation.cache_info().currsize == 0
    assert torch.equal(cached.train_labelled, first.train_labelled)
    # at least one labelled image; fraction 1 labels all; the six-field constructor labels all
    assert label_mask(50, 0.001, 0, 0).sum() == 1 and label_mask(50, 1.0, 0, 0).all()
    plain = ClientData(*(getattr(first, f) for f in data_mod.CLIENT_DATA_FIELDS[:6]))
    assert bool(plain.train_labelled.all()) and plain.has_global


# ------------------------------------------------------------------------------ device data
def assert_same_as_simulation(device: ClientData, sim: ClientData, with_global: bool) -> None:
    assert torch.equal(device.train_x, sim.train_x)
    assert torch.equal(device.train_labelled, sim.train_labelled)
    assert torch.equal(device.train_y[sim.train_labelled], sim.train_y[sim.train_labelled])
    assert bool((device.train_y[~sim.train_labelled] == -1).all())
    assert torch.equal(device.test_x, sim.test_x) and torch.equal(device.test_y, sim.test_y)
    if with_global:
        assert torch.equal(device.global_x, sim.global_x)
        assert torch.equal(device.global_y, sim.global_y)
    else:
        assert device.global_x.shape == (0, *sim.global_x.shape[1:]) and not device.has_global


@pytest.mark.parametrize(
    "fmt,with_global", [("npz", True), ("imagefolder", True), ("imagefolder", False)]
)
def test_exported_device_folders_hold_the_simulation_split(
    tmp_path: Path, fmt: str, with_global: bool
) -> None:
    argv = [
        "--dataset=digits",
        "--partition=dirichlet",
        "--alpha=0.5",
        "--nodes=3",
        "--seed=4",
        f"--out={tmp_path}",
        f"--format={fmt}",
        "--subsample=600",
        "--label-fraction=0.5",
    ] + (["--with-global-test"] if with_global else [])
    assert export_device_data.main(argv) == 0
    cfg = compose_config(export_device_data.overrides_of(export_device_data.parse_args(argv)))
    spec = federation_spec(cfg)
    for pid in range(3):
        device, info = load_device_data(tmp_path / f"device-{pid}", 0.2, seed=123)
        assert info == DATASETS["digits"]
        assert_same_as_simulation(device, load_client_data(spec, pid, 3)[0], with_global)
    # a second export into the same folders is refused and changes nothing
    before = (tmp_path / "device-0" / "metadata.json").read_bytes()
    assert export_device_data.main(argv) == 2
    assert (tmp_path / "device-0" / "metadata.json").read_bytes() == before


def fake_client(info, n_train: int = 12, n_test: int = 4, n_global: int = 0) -> ClientData:
    rng = np.random.default_rng(5)

    def images(n: int) -> torch.Tensor:
        raw = rng.integers(0, int(info.pixel_max) + 1, (n, *info.image_shape), dtype=np.uint8)
        return torch.from_numpy(normalise(raw, info.mean, info.std, info.pixel_max))

    def labels(n: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, info.num_classes, n))

    mask = torch.from_numpy(np.arange(n_train) % 3 != 0)
    return ClientData(
        images(n_train),
        labels(n_train),
        images(n_test),
        labels(n_test),
        images(n_global),
        labels(n_global),
        mask,
    )


def test_rgb_image_folder_round_trip(tmp_path: Path) -> None:
    info = DATASETS["cifar10"]
    client = fake_client(info, n_global=3)
    write_device_data(tmp_path / "dev", client, info, fmt="imagefolder", with_global=True)
    assert (tmp_path / "dev" / "train" / "unlabelled").is_dir()
    loaded, _ = load_device_data(tmp_path / "dev", 0.2, 0)
    assert_same_as_simulation(loaded, client, with_global=True)


def write_metadata(folder: Path, info=FASHION, **changes) -> None:
    meta = {
        "format": "nmoe-device-data",
        "format_version": 1,
        "dataset": info.name,
        "class_names": list(info.class_names),
        "image_shape": list(info.image_shape),
        "mean": list(info.mean),
        "std": list(info.std),
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_device_without_test_split_splits_one_off_with_a_fixed_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    y = np.where(np.arange(40) % 4 == 0, -1, np.arange(40) % 10).astype(np.int64)
    write_metadata(tmp_path)
    np.savez(tmp_path / "samples.npz", train_x=x, train_y=y)
    client, info = load_device_data(tmp_path, 0.2, seed=7)
    again, _ = load_device_data(tmp_path, 0.2, seed=7)
    other, _ = load_device_data(tmp_path, 0.2, seed=8)
    assert info.name == "fashion_mnist" and info.background == FASHION.background
    assert len(client.test_y) == round(0.2 * 30) and len(client.train_y) == 40 - 6
    assert bool((client.test_y >= 0).all())  # tests come from labelled images only
    assert torch.equal(client.test_x, again.test_x) and not torch.equal(client.test_x, other.test_x)
    assert int((~client.train_labelled).sum()) == 10 and bool(
        (client.train_y[~client.train_labelled] == -1).all()
    )
    all_x = normalise(x, FASHION.mean, FASHION.std, 255)
    assert image_keys(torch.cat([client.train_x, client.test_x])) == image_keys(
        torch.from_numpy(all_x)
    )
    assert client.global_x.shape == (0, 1, 28, 28) and client.global_y.shape == (0,)
    assert not client.has_global


def good_npz() -> dict[str, np.ndarray]:
    return {
        "train_x": np.zeros((4, 1, 28, 28), np.uint8),
        "train_y": np.array([0, 1, -1, 2], np.int64),
    }


BAD_DEVICE_DATA = {
    "missing metadata": (None, good_npz(), "metadata.json"),
    "not json": ("{", good_npz(), "not valid JSON"),
    "wrong version": ({"format_version": 2}, good_npz(), "version 2"),
    "unknown key": ({"colour": "red"}, good_npz(), "unknown key"),
    "other constants": ({"mean": [0.5]}, good_npz(), "'mean'"),
    "NHWC images": (
        {},
        {**good_npz(), "train_x": np.zeros((4, 28, 28, 1), np.uint8)},
        r"expected \(N, 1, 28, 28\)",
    ),
    "label out of range": ({}, {**good_npz(), "train_y": np.array([0, 1, 10, 2])}, "outside -1..9"),
    "unlabelled test image": (
        {},
        {**good_npz(), "test_x": np.zeros((1, 1, 28, 28), np.uint8), "test_y": np.array([-1])},
        "outside 0..9",
    ),
    "non-finite": (
        {},
        {**good_npz(), "train_x": np.full((4, 1, 28, 28), np.nan, np.float32)},
        "non-finite",
    ),
    "float64": ({}, {**good_npz(), "train_x": np.zeros((4, 1, 28, 28))}, "float64"),
    "pixel above pixel_max": (
        {"pixel_max": 16},
        {**good_npz(), "train_x": np.full((4, 1, 28, 28), 17, np.uint8)},
        "pixel 17",
    ),
    "pickled objects": ({}, {**good_npz(), "train_y": np.array([0, 1, None, 2], object)}, "pickle"),
    "x without y": ({}, {"train_x": good_npz()["train_x"]}, "come together"),
    "no images": ({}, None, "no training images"),
}


@pytest.mark.parametrize("case", BAD_DEVICE_DATA, ids=list(BAD_DEVICE_DATA))
def test_bad_device_data_is_refused_with_a_clear_error(tmp_path: Path, case: str) -> None:
    meta, arrays, message = BAD_DEVICE_DATA[case]
    tmp_path.mkdir(exist_ok=True)
    if isinstance(meta, dict):
        write_metadata(tmp_path, **meta)
    elif isinstance(meta, str):
        (tmp_path / "metadata.json").write_text(meta)
    if arrays is not None:
        np.savez(tmp_path / "samples.npz", **arrays)
    with pytest.raises(DeviceDataError, match=message):
        load_device_data(tmp_path, 0.2, 0)


def test_bad_image_folders_are_refused(tmp_path: Path) -> None:
    from PIL import Image

    write_metadata(tmp_path)
    (tmp_path / "train" / "shoes").mkdir(parents=True)
    with pytest.raises(DeviceDataError, match="not a class folder"):
        load_device_data(tmp_path, 0.2, 0)
    (tmp_path / "train" / "shoes").rmdir()
    (tmp_path / "train" / "Sneaker").mkdir()  # a class name works as well as an index
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "train" / "Sneaker" / "a.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "train" / "Sneaker" / "b.png")
    client, _ = load_device_data(tmp_path, 0.5, 0)
    assert torch.cat([client.train_y, client.test_y]).tolist() == [7, 7]
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(tmp_path / "train" / "Sneaker" / "c.png")
    with pytest.raises(DeviceDataError, match="expected 28x28"):
        load_device_data(tmp_path, 0.2, 0)


# ----------------------------------------------------------------------------------- CIFAR-10
class Planted:
    """What an attacker puts into a batch file: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_planted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    payload = {"data": Planted(tmp_path / "pwned"), "labels": [1]}
    control = tmp_path / "control"
    pickle.loads(pickle.dumps({"data": Planted(control)}))  # the payload is live
    assert control.exists()
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload))
    with pytest.raises(DatasetIntegrityError) as err:
        load_arrays(
            compose_config(["dataset=cifar10", f"dataset.path={tmp_path / 'cifar'}"]).dataset
        )
    assert "data_batch_1" in str(err.value) and "refused global" in str(err.value)
    assert "system" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def python2_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the official (Python 2, protocol 2) files are: str keys and raw
    bytes as BINSTRING, numpy under its old module name `numpy.core.multiarray`."""

    def text(raw: bytes) -> bytes:
        return (
            b"U" + bytes([len(raw)]) + raw
            if len(raw) < 256
            else b"T" + struct.pack("<I", len(raw)) + raw
        )

    def num(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    dtype = b"cnumpy\ndtype\n" + text(b"u1") + num(0) + num(1) + b"\x87R"
    dtype += b"(" + num(3) + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + num(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85"
    array += text(b"b") + b"\x87R(" + num(1) + num(pixels.shape[0]) + num(pixels.shape[1])
    array += b"\x86" + dtype + b"\x89" + text(pixels.tobytes()) + b"tb"
    label_list = b"](" + b"".join(num(v) for v in labels) + b"e"
    entry = text(b"batch_label") + text(b"training batch 1 of 5") + text(b"data") + array
    return b"\x80\x02}(" + entry + text(b"labels") + label_list + b"u."


def test_official_style_python2_batches_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 7)]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(python2_batch(pixels, labels))
    x, y = ds.load_cifar_batch(folder / "test_batch")
    assert np.array_equal(x, pixels.reshape(7, 3, 32, 32)) and y.tolist() == labels
    raw = ds.read_cifar10_folder(str(tmp_path))
    assert np.array_equal(raw.images, x)


def test_cifar_checksums_in_an_official_folder(tmp_path: Path, caplog) -> None:
    import torchvision.datasets

    official = torchvision.datasets.CIFAR10
    listed = dict(official.train_list + official.test_list)
    listed[official.meta["filename"]] = official.meta["md5"]
    assert listed == ds.CIFAR10_MD5  # the constants are torchvision's list
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    )
    # without batches.meta the folder is hand-made: loaded, with a warning
    assert len(ds.read_cifar10_folder(str(tmp_path)).labels) == 2
    assert "checksums not verified" in caplog.text
    (folder / "batches.meta").write_bytes(b"not the official file")
    with pytest.raises(DatasetIntegrityError, match=r"MD5 .*dataset\.verify_checksums=false"):
        load_arrays(compose_config(["dataset=cifar10", f"dataset.path={tmp_path}"]).dataset)
    cfg = compose_config(
        ["dataset=cifar10", f"dataset.path={tmp_path}", "dataset.verify_checksums=false"]
    )
    assert load_arrays(cfg.dataset).images.shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override,key",
    [
        ("dataset.label_fraction=0", "dataset.label_fraction"),
        ("dataset.label_fraction=1.5", "dataset.label_fraction"),
        ("dataset.subsample=-1", "dataset.subsample"),
        ("dataset.max_samples=-3", "dataset.max_samples"),
    ],
)
def test_new_data_keys_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        compose_config([override])


def test_fashion_mnist_config_group() -> None:
    cfg = compose_config(["dataset=fashion_mnist", "dataset.subsample=1000"])
    assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.hf_name == FASHION.hf_name
    assert cfg.dataset.label_fraction == 1.0 and cfg.dataset.verify_checksums is True
