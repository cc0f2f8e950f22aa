"""Dataset facts (shapes, classes, fixed normalisation) and the offline loaders of each source.

Every loader reads local files only: nothing here downloads. Raw pixels come back as integers
in `[0, pixel_max]`, images as NCHW; `normalise` turns them into model input with the fixed
constants of `DATASETS` (never statistics of the data at hand, which no device could compute).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Where Debian-style dataset packages install their files (`dataset-fashion-mnist` puts the four
# idx files in /usr/share/datasets/fashion-mnist); tests point this at a fixture folder.
SYSTEM_DATASET_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets"),
    Path("/usr/local/share/datasets"),
)
DEBIAN_FASHION_MNIST_DIR = "fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
# MD5 of the official python batches, as listed in torchvision/datasets/cifar.py (CIFAR10).
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

# Normalisation constants, per channel, on the [0, 1] intensity scale (raw / pixel_max).
# digits: mean and (population) std of all 1797 scikit-learn digits' pixels / 16, computed once
#   with numpy in float64 (`x = load_digits().images / 16; x.mean(), x.std()`).
DIGITS_MEAN = (0.3052603,)
DIGITS_STD = (0.3760492,)
# Fashion-MNIST: mean and std of the 60,000 training images' pixels / 255 (Debian's
#   train-images-idx3-ubyte.gz, float64), the usual 0.2860 / 0.3530.
FASHION_MNIST_MEAN = (0.2860406,)
FASHION_MNIST_STD = (0.3530242,)
# CIFAR-10: the customary per-channel statistics of the 50,000 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MAX_INTENSITY = 16.0


class DatasetUnavailableError(RuntimeError):
    """The configured dataset cannot be found locally."""


class DatasetIntegrityError(DatasetUnavailableError):
    """A dataset file is there but refused: unsafe content, wrong format or wrong checksum."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the server and the devices know about a dataset without loading any of it."""

    name: str
    image_shape: tuple[int, int, int]  # (C, H, W) of the model input
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale (raw / pixel_max)
    std: tuple[float, ...]
    # Normalised value of a blank (raw 0) pixel per channel, for augmentation fill;
    # None = derived from mean/std.
    background: tuple[float, ...] = field(default=None)  # type: ignore[assignment]
    pixel_max: float = 255.0  # raw intensity of a full pixel in the dataset's own files
    hf_name: str | None = None  # Hugging Face dataset id, read from the HF cache only

    def __post_init__(self) -> None:
        if self.background is None:
            blank = tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))
            object.__setattr__(self, "background", blank)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.image_shape[0]


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits",
        (1, 8, 8),
        tuple(str(d) for d in range(10)),
        DIGITS_MEAN,
        DIGITS_STD,
        pixel_max=DIGITS_MAX_INTENSITY,
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        (1, 28, 28),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        hf_name="zalando-datasets/fashion_mnist",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        (3, 32, 32),
        (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        CIFAR10_MEAN,
        CIFAR10_STD,
        hf_name="uoft-cs/cifar10",
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`, or `DatasetUnavailableError` naming the known ones."""
    if name not in DATASETS:
        raise DatasetUnavailableError(
            f"unknown dataset '{name}', known: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


@dataclass(frozen=True)
class RawImages:
    """A dataset as stored: integer pixels (N, C, H, W) in [0, pixel_max], labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo
    pixel_max: float

    def select(self, index: np.ndarray) -> RawImages:
        return RawImages(self.images[index], self.labels[index], self.info, self.pixel_max)


def normalise(
    raw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], pixel_max: float
) -> np.ndarray:
    """Model input from raw NCHW pixels: `(raw / pixel_max - mean) / std`, float32, per channel.
    The one formula for every source and for device data, so both give identical tensors."""
    out = raw.astype(np.float32)  # a copy: the in-place steps below never touch `raw`
    out /= np.float32(pixel_max)
    out -= np.asarray(mean, np.float32)[None, :, None, None]
    out /= np.asarray(std, np.float32)[None, :, None, None]
    return out


# ------------------------------------------------------------------------------------- digits
def read_digits() -> RawImages:
    """scikit-learn's digits (shipped in the wheel): 1797 images, values 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]
    return RawImages(images, bunch.target.astype(np.int64), DATASETS["digits"], 16.0)


# ------------------------------------------------------------------------------ Fashion-MNIST
IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format; gzip-compressed when its name ends in `.gz`) as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            blob = handle.read()
    except (OSError, EOFError) as err:
        raise DatasetIntegrityError(f"cannot read idx file '{path}': {err}") from err
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != IDX_UBYTE:
        raise DatasetIntegrityError(
            f"'{path}' is not an unsigned-byte idx file (magic {blob[:4].hex() or 'missing'})"
        )
    ndim = blob[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(blob[4:header], ">u4")) if ndim else ()
    if len(shape) != ndim or len(blob) - header != int(np.prod(shape)):
        raise DatasetIntegrityError(
            f"'{path}': header says shape {shape}, payload holds {len(blob) - header} bytes"
        )
    return np.frombuffer(blob, np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _holds_fashion_mnist(folder: Path) -> bool:
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    return all(_idx_file(folder, stem) is not None for stem in stems)


def read_fashion_mnist_folder(folder: Path) -> RawImages:
    """The four idx files (plain or .gz) of one folder: train (60,000) then test (10,000)."""
    images, labels = [], []
    for split, (image_stem, label_stem) in FASHION_MNIST_FILES.items():
        image_file, label_file = _idx_file(folder, image_stem), _idx_file(folder, label_stem)
        if image_file is None or label_file is None:
            raise DatasetUnavailableError(f"no Fashion-MNIST {split} idx files in '{folder}'")
        x, y = read_idx(image_file), read_idx(label_file)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise DatasetIntegrityError(
                f"'{folder}': {split} images {x.shape} and labels {y.shape} are not "
                "Fashion-MNIST's (N, 28, 28) and (N,)"
            )
        if y.size and int(y.max()) >= 10:
            raise DatasetIntegrityError(f"'{label_file}': label {int(y.max())} outside 0..9")
        images.append(x[:, None, :, :])
        labels.append(y.astype(np.int64))
    return RawImages(
        np.concatenate(images), np.concatenate(labels), DATASETS["fashion_mnist"], 255.0
    )


def _fashion_mnist_candidates(path: str) -> list[Path]:
    root = Path(path).expanduser()
    return [root, root / "raw", root / "FashionMNIST" / "raw"]


def fashion_mnist_help() -> str:
    """The three ways to provide Fashion-MNIST, for error messages."""
    share = ", ".join(str(d / DEBIAN_FASHION_MNIST_DIR) for d in SYSTEM_DATASET_DIRS)
    return (
        "Provide it one of three ways: (1) `apt-get install dataset-fashion-mnist` (as root; "
        f"installs the idx files in {share}); (2) dataset.path=<torchvision's FashionMNIST/raw "
        "folder, or its parent> holding train/t10k-images-idx3-ubyte and -labels-idx1-ubyte "
        "(.gz or not); (3) the HF cache holding 'zalando-datasets/fashion_mnist' (filled once "
        "by `datasets.load_dataset` on a machine with network access; read offline here)"
    )


def read_fashion_mnist(path: str | None = None, hf_name: str | None = None) -> RawImages:
    """Fashion-MNIST from `path` (torchvision's raw folder or its parent), else from the system
    share dirs (Debian's dataset-fashion-mnist), else from the HF cache, offline."""
    if path:
        for folder in _fashion_mnist_candidates(path):
            if _holds_fashion_mnist(folder):
                log.info("Fashion-MNIST from %s", folder)
                return read_fashion_mnist_folder(folder)
        # an explicit path that holds nothing is a mistake: say so rather than read elsewhere
        raise DatasetUnavailableError(
            f"dataset.path='{path}' holds no Fashion-MNIST idx files (looked in "
            f"{', '.join(str(p) for p in _fashion_mnist_candidates(path))}). "
            + fashion_mnist_help()
        )
    for share in SYSTEM_DATASET_DIRS:
        folder = share / DEBIAN_FASHION_MNIST_DIR
        if _holds_fashion_mnist(folder):
            log.info("Fashion-MNIST from %s", folder)
            return read_fashion_mnist_folder(folder)
    name = hf_name or DATASETS["fashion_mnist"].hf_name
    assert name is not None
    try:
        images, labels = _hf_images(name, ("image",))
    except DatasetUnavailableError as err:
        raise DatasetUnavailableError(
            f"Fashion-MNIST is not on this machine (no dataset.path, nothing in the system share "
            f"dirs, '{name}' not in the HF cache: {err}). " + fashion_mnist_help()
        ) from err
    if images.shape[1:] != (1, 28, 28):
        raise DatasetIntegrityError(f"'{name}' in the HF cache has images of shape {images.shape}")
    return RawImages(images, labels, DATASETS["fashion_mnist"], 255.0)


# --------------------------------------------------------------------------------- HF cache
@contextmanager
def hf_offline() -> Iterator[None]:
    """HF `datasets` and `huggingface_hub` in offline mode for the duration (cache only)."""
    import datasets.config
    import huggingface_hub.constants

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {key: os.environ.get(key) for key in keys}
    saved = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    os.environ.update(dict.fromkeys(keys, "1"))
    # both libraries read the variables once, at import: set their switches too
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE,
        ) = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _hf_images(hf_name: str, image_columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) uint8 and labels of every split of a cached HF dataset, train first."""
    from datasets import concatenate_datasets, load_dataset

    try:
        with hf_offline():
            parts = load_dataset(hf_name)
    except Exception as err:  # datasets raises many kinds when a dataset is not cached
        raise DatasetUnavailableError(
            f"'{hf_name}' could not be loaded from the HF cache ({type(err).__name__})"
        ) from err
    order = sorted(parts, key=lambda split: (split != "train", split != "test", split))
    merged = concatenate_datasets([parts[split] for split in order])
    column = next((c for c in image_columns if c in merged.column_names), None)
    if column is None or "label" not in merged.column_names:
        raise DatasetIntegrityError(
            f"'{hf_name}' has columns {merged.column_names}, expected one of {image_columns} "
            "and 'label'"
        )
    images = np.stack([np.asarray(img, np.uint8) for img in merged[column]])
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.asarray(merged["label"], np.int64)


# ----------------------------------------------------------------------------------- CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 python batch holds: builtin containers, strings, numbers and
    numpy arrays (rebuilt by `_reconstruct`, `ndarray`, `dtype`). Any other global (a callable
    a planted payload would run) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refused global '{module}.{name}': a CIFAR-10 batch holds only dicts, lists, "
                "strings, numbers and numpy arrays"
            )
        return allowed[(module, name)]


def load_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch, read with the restricted unpickler: pixels (N, 3, 32, 32)
    uint8 and labels (N,) int64."""
    try:
        with file.open("rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except Exception as err:
        raise DatasetIntegrityError(
            f"refused CIFAR-10 batch '{file}': {type(err).__name__}: {err}. Fix: replace it "
            "with the official file (torchvision's CIFAR10 format)"
        ) from err
    if not isinstance(entry, dict):
        raise DatasetIntegrityError(f"'{file}' holds a {type(entry).__name__}, not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DatasetIntegrityError(f"'{file}' has keys {sorted(map(str, entry))}, no data/labels")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetIntegrityError(f"'{file}': data {data.dtype} {data.shape}, not (N, 3072) u1")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DatasetIntegrityError(f"'{file}': labels {labels.shape} for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DatasetIntegrityError(f"'{file}': labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def md5sum(file: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cifar_checksums(batch_dir: Path, files: list[Path]) -> None:
    """In an official release folder (it holds `batches.meta`), every batch present must have
    its official MD5. A folder without `batches.meta` is hand-made: loaded unverified."""
    meta = batch_dir / "batches.meta"
    if not meta.is_file():
        log.warning(
            "%s has no batches.meta: not the official CIFAR-10 release, checksums not verified",
            batch_dir,
        )
        return
    for file in [meta, *files]:
        actual = md5sum(file)
        if actual != CIFAR10_MD5[file.name]:
            raise DatasetIntegrityError(
                f"'{file}' has MD5 {actual}, the official file has {CIFAR10_MD5[file.name]}: "
                "corrupted or altered. Fix: restore the official cifar-10-batches-py (e.g. "
                "torchvision.datasets.CIFAR10(root, download=True) on a machine with network), "
                "or set dataset.verify_checksums=false for your own data in this format"
            )


def read_cifar10_folder(path: str, verify_checksums: bool = True) -> RawImages:
    """CIFAR-10 from torchvision's on-disk format (`cifar-10-batches-py`), no download."""
    root = Path(path).expanduser()
    batch_dir = root / CIFAR10_FOLDER if (root / CIFAR10_FOLDER).is_dir() else root
    present = [batch_dir / name for name in CIFAR10_BATCHES if (batch_dir / name).is_file()]
    if not present:
        raise DatasetUnavailableError(
            f"no CIFAR-10 batches under '{root}': expected torchvision's "
            "'cifar-10-batches-py/data_batch_1..5, test_batch'. Fix: set dataset.path to the "
            "folder that holds cifar-10-batches-py (e.g. from torchvision.datasets.CIFAR10(root, "
            "download=True) on a machine with network), or leave dataset.path unset to read "
            "dataset.hf_name from the HF cache"
        )
    if verify_checksums:
        verify_cifar_checksums(batch_dir, present)
    batches = [load_cifar_batch(file) for file in present]
    return RawImages(
        np.concatenate([x for x, _ in batches]),
        np.concatenate([y for _, y in batches]),
        DATASETS["cifar10"],
        255.0,
    )


def read_cifar10_hf(hf_name: str) -> RawImages:
    """CIFAR-10 from the HF cache (offline: never downloads)."""
    try:
        images, labels = _hf_images(hf_name, ("img", "image"))
    except DatasetUnavailableError as err:
        raise DatasetUnavailableError(
            f"CIFAR-10 is not available: {err}. Fix: set dataset.path=/dir/with/"
            "cifar-10-batches-py (torchvision format), or fill the HF cache with it once on a "
            "machine with network access (`datasets.load_dataset('uoft-cs/cifar10')`)"
        ) from err
    if images.shape[1:] != (3, 32, 32):
        raise DatasetIntegrityError(f"'{hf_name}' in the HF cache has images of {images.shape}")
    return RawImages(images, labels, DATASETS["cifar10"], 255.0)


def read_dataset(dataset_cfg: Any) -> RawImages:
    """The configured dataset as raw pixels (name, path, hf_name, verify_checksums)."""
    info = dataset_info(dataset_cfg.name)
    hf_name = getattr(dataset_cfg, "hf_name", None) or info.hf_name
    path = getattr(dataset_cfg, "path", None)
    if info.name == "digits":
        return read_digits()
    if info.name == "fashion_mnist":
        return read_fashion_mnist(path, hf_name)
    if path:
        return read_cifar10_folder(path, bool(getattr(dataset_cfg, "verify_checksums", True)))
    assert hf_name is not None
    return read_cifar10_hf(hf_name)
