"""A device's own samples on disk (node config `data-dir`): reading, checking and writing.

Format (version 1) of a data folder:

- `metadata.json` (required): `format` = "nmoe-device-data", `format_version` = 1, `dataset`,
  `class_names`, `image_shape` [C, H, W], `mean`, `std` (per channel, on the [0, 1] scale),
  optional `background` (normalised blank pixel per channel), `pixel_max` (raw value of a full
  pixel, default 255), `label_fraction`, `description`, `provenance` (free-form).
- `samples.npz` (optional, read without pickle): `train_x`, `train_y`, optional `test_x`/`test_y`,
  `global_x`/`global_y`. Images are NCHW, either uint8 raw pixels in [0, pixel_max] (normalised on
  load with mean/std) or float32 already normalised (used as they are). Labels are integers
  (int64), -1 = unlabelled (training images only).
- `train/<class>/*.png` and optional `test/<class>/*.png` (optional): raw pixels in
  [0, pixel_max]; `<class>` is the class index or a class name of `class_names`;
  `train/unlabelled/` holds training images without a label. Images are read in file-name order.

Both may be present: their samples are concatenated (npz first). Without any test split, a
`local_test_fraction` of the labelled training images is split off with a fixed seed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json_atomic, write_npz_atomic
from .data import ClientData
from .datasets import DATASETS, DatasetInfo, normalise

FORMAT_NAME = "nmoe-device-data"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SAMPLES_FILE = "samples.npz"
TRAIN_DIR, TEST_DIR = "train", "test"
UNLABELLED_DIR = "unlabelled"
UNLABELLED = -1
IMAGE_SUFFIXES = (".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test", "global")
REQUIRED_KEYS = ("format", "format_version", "dataset", "class_names", "image_shape", "mean", "std")
OPTIONAL_KEYS = ("background", "pixel_max", "label_fraction", "description", "provenance")
# Registry facts must agree with a device's metadata to this tolerance.
CONSTANT_TOLERANCE = 1e-6


class DeviceDataError(ValueError):
    """A device data folder is missing, incomplete or not in the documented format."""


def _fail(where: Path, message: str) -> DeviceDataError:
    return DeviceDataError(f"device data '{where}': {message}")


def _floats(meta: dict[str, Any], key: str, length: int, where: Path) -> tuple[float, ...]:
    value = meta[key]
    ok = isinstance(value, list) and len(value) == length
    ok = ok and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    if not ok:
        raise _fail(where, f"'{key}' must be a list of {length} finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def read_metadata(data_dir: Path) -> tuple[DatasetInfo, dict[str, Any]]:
    """The dataset facts of a device data folder (checked) and its raw metadata."""
    where = data_dir / METADATA_FILE
    if not data_dir.is_dir():
        raise _fail(data_dir, "no such folder (node config data-dir)")
    if not where.is_file():
        raise _fail(where, f"missing: every data folder needs a {METADATA_FILE} (format v1)")
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(where, f"not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise _fail(where, "must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise _fail(where, f"missing key(s) {', '.join(missing)}")
    unknown = sorted(set(meta) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(unknown)}")
    if meta["format"] != FORMAT_NAME or meta["format_version"] != FORMAT_VERSION:
        raise _fail(
            where,
            f"format {meta['format']!r} version {meta['format_version']!r}, this code reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}",
        )
    name, names, shape = meta["dataset"], meta["class_names"], meta["image_shape"]
    if not isinstance(name, str) or not name:
        raise _fail(where, "'dataset' must be a non-empty string")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise _fail(where, "'class_names' must be a list of at least 2 distinct non-empty strings")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(v, int) and v > 0 for v in shape)
        or shape[0] not in (1, 3)
    ):
        raise _fail(where, f"'image_shape' must be [C, H, W] with C 1 or 3, got {shape!r}")
    channels = shape[0]
    mean = _floats(meta, "mean", channels, where)
    std = _floats(meta, "std", channels, where)
    if min(std) <= 0:
        raise _fail(where, f"'std' must be > 0, got {list(std)}")
    background = _floats(meta, "background", channels, where) if "background" in meta else None
    pixel_max = meta.get("pixel_max", 255)
    if not isinstance(pixel_max, int | float) or not 0 < pixel_max <= 255:
        raise _fail(where, f"'pixel_max' must be in (0, 255], got {pixel_max!r}")
    fraction = meta.get("label_fraction", 1.0)
    if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise _fail(where, f"'label_fraction' must be in (0, 1], got {fraction!r}")
    info = DatasetInfo(
        name, (shape[0], shape[1], shape[2]), tuple(names), mean, std, background, pixel_max
    )
    known = DATASETS.get(name)
    if known is not None:  # every device of a federation must feed the model the same input
        for key in ("image_shape", "num_classes", "mean", "std"):
            mine, theirs = getattr(info, key), getattr(known, key)
            same = (
                np.allclose(mine, theirs, rtol=0, atol=CONSTANT_TOLERANCE)
                if key in ("mean", "std")
                else mine == theirs
            )
            if not same:
                raise _fail(where, f"'{key}' {mine} differs from dataset '{name}'s {theirs}")
    return info, meta


def _check_images(x: np.ndarray, info: DatasetInfo, pixel_max: float, what: str, where: Path):
    c, h, w = info.image_shape
    if x.ndim != 4 or tuple(x.shape[1:]) != info.image_shape:
        raise _fail(
            where,
            f"{what} has shape {tuple(x.shape)}, expected (N, {c}, {h}, {w}) (NCHW)",
        )
    if x.dtype == np.uint8:
        if x.size and int(x.max()) > pixel_max:
            raise _fail(where, f"{what} holds pixel {int(x.max())} > pixel_max {pixel_max}")
        return normalise(x, info.mean, info.std, pixel_max)
    if x.dtype == np.float32:
        if not np.isfinite(x).all():
            raise _fail(where, f"{what} holds non-finite values")
        return x
    raise _fail(where, f"{what} is {x.dtype}: expected uint8 (raw) or float32 (normalised)")


def _check_labels(y: np.ndarray, n: int, info: DatasetInfo, what: str, where: Path, low: int):
    if y.ndim != 1 or len(y) != n:
        raise _fail(where, f"{what} has shape {tuple(y.shape)}, expected ({n},)")
    if y.dtype.kind not in "iu":
        raise _fail(where, f"{what} is {y.dtype}: expected integers (int64)")
    if y.size and (int(y.min()) < low or int(y.max()) >= info.num_classes):
        allowed = f"{low}..{info.num_classes - 1}"
        raise _fail(
            where, f"{what} holds labels outside {allowed} ({int(y.min())}..{int(y.max())})"
        )
    return y.astype(np.int64)


def _read_npz(file: Path, info: DatasetInfo, pixel_max: float) -> dict[str, tuple]:
    try:
        npz = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _fail(file, f"not a readable .npz: {err}") from err
    out: dict[str, tuple] = {}
    with npz:
        allowed = {f"{s}_{k}" for s in SPLITS for k in "xy"}
        unknown = sorted(set(npz.files) - allowed)
        if unknown:
            raise _fail(file, f"unknown array(s) {', '.join(unknown)}; allowed {sorted(allowed)}")
        for split in SPLITS:
            has_x, has_y = f"{split}_x" in npz.files, f"{split}_y" in npz.files
            if has_x != has_y:
                raise _fail(file, f"{split}_x and {split}_y come together")
            if not has_x:
                continue
            try:
                x, y = npz[f"{split}_x"], npz[f"{split}_y"]
            except ValueError as err:  # object arrays need pickle: refused
                raise _fail(file, f"{split}: {err}") from err
            images = _check_images(x, info, pixel_max, f"{split}_x", file)
            low = UNLABELLED if split == "train" else 0
            out[split] = (images, _check_labels(y, len(x), info, f"{split}_y", file, low))
    return out


def _class_folders(root: Path, info: DatasetInfo, allow_unlabelled: bool) -> dict[str, int]:
    by_name = {name: index for index, name in enumerate(info.class_names)}
    mapping: dict[str, int] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.isdigit() and int(folder.name) < info.num_classes:
            mapping[folder.name] = int(folder.name)
        elif folder.name in by_name:
            mapping[folder.name] = by_name[folder.name]
        elif allow_unlabelled and folder.name == UNLABELLED_DIR:
            mapping[folder.name] = UNLABELLED
        else:
            raise _fail(
                folder,
                f"not a class folder: use a class index 0..{info.num_classes - 1}, a class "
                f"name of metadata.json" + (f" or '{UNLABELLED_DIR}'" if allow_unlabelled else ""),
            )
    return mapping


def _read_image_folder(root: Path, info: DatasetInfo, pixel_max: float, split: str) -> tuple:
    from PIL import Image
    from torchvision.datasets.folder import make_dataset

    mapping = _class_folders(root, info, allow_unlabelled=split == "train")
    samples = make_dataset(root, mapping, extensions=IMAGE_SUFFIXES, allow_empty=True)
    samples.sort(key=lambda item: (Path(item[0]).name, item[0]))
    channels, height, width = info.image_shape
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(samples), channels, height, width), np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                if img.size != (width, height):
                    raise _fail(
                        Path(path),
                        f"image is {img.size[0]}x{img.size[1]}, expected {width}x{height}",
                    )
                pixels = np.asarray(img if img.mode == mode else img.convert(mode), np.uint8)
        except OSError as err:
            raise _fail(Path(path), f"not a readable image: {err}") from err
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    labels = np.array([label for _, label in samples], np.int64)
    return _check_images(images, info, pixel_max, f"{split}/ images", root), labels


def _concat(parts: list[tuple], info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros((0, *info.image_shape), np.float32), np.zeros(0, np.int64)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def load_device_data(
    data_dir: Path, local_test_fraction: float, seed: int
) -> tuple[ClientData, DatasetInfo]:
    """A device's own samples from its data folder (format v1, see the module docstring).
    Without a test split, `local_test_fraction` of the labelled training images become the
    local test split (seeded by `seed`). Without a global test set, `global_x`/`global_y` have
    0 rows."""
    if not 0 < local_test_fraction < 1:
        raise ValueError(f"local_test_fraction must be in (0, 1), got {local_test_fraction}")
    data_dir = Path(data_dir).expanduser()
    info, meta = read_metadata(data_dir)
    pixel_max = float(meta.get("pixel_max", 255))
    parts: dict[str, list[tuple]] = {split: [] for split in SPLITS}
    if (data_dir / SAMPLES_FILE).is_file():
        for split, pair in _read_npz(data_dir / SAMPLES_FILE, info, pixel_max).items():
            parts[split].append(pair)
    for split, folder in (("train", TRAIN_DIR), ("test", TEST_DIR)):
        if (data_dir / folder).is_dir():
            parts[split].append(_read_image_folder(data_dir / folder, info, pixel_max, split))
    train_x, train_y = _concat(parts["train"], info)
    test_x, test_y = _concat(parts["test"], info)
    global_x, global_y = _concat(parts["global"], info)
    if len(train_y) == 0:
        raise _fail(
            data_dir, f"no training images (neither {SAMPLES_FILE} train_x nor {TRAIN_DIR}/)"
        )
    if not parts["test"]:
        train_x, train_y, test_x, test_y = _split_off_test(
            train_x, train_y, local_test_fraction, seed, data_dir
        )
    client = ClientData(
        *(torch.from_numpy(np.ascontiguousarray(a)) for a in (train_x, train_y, test_x, test_y)),
        torch.from_numpy(global_x),
        torch.from_numpy(global_y),
        torch.from_numpy(train_y != UNLABELLED),
    )
    return client, info


def _split_off_test(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, where: Path):
    """Move `fraction` of the labelled images (at least one, never all) into a test split."""
    candidates = np.flatnonzero(y != UNLABELLED)
    if len(candidates) < 2:
        raise _fail(
            where,
            f"no test split and {len(candidates)} labelled training image(s): a test split "
            "needs a test_x/test_y or test/ folder, or at least 2 labelled training images",
        )
    count = min(max(1, round(fraction * len(candidates))), len(candidates) - 1)
    test = np.sort(np.random.default_rng(seed).permutation(candidates)[:count])
    keep = np.setdiff1d(np.arange(len(y)), test)
    return x[keep], y[keep], x[test], y[test]


# ------------------------------------------------------------------------------------ writing
def _as_raw(x: torch.Tensor, info: DatasetInfo, pixel_max: float) -> np.ndarray | None:
    """The uint8 raw pixels whose normalisation gives exactly `x`, or None if there are none."""
    values = x.numpy()
    mean = np.asarray(info.mean, np.float64)[None, :, None, None]
    std = np.asarray(info.std, np.float64)[None, :, None, None]
    raw = np.rint((values.astype(np.float64) * std + mean) * pixel_max)
    if raw.size and (raw.min() < 0 or raw.max() > pixel_max):
        return None
    raw = raw.astype(np.uint8)
    return raw if np.array_equal(normalise(raw, info.mean, info.std, pixel_max), values) else None


def write_device_data(
    out_dir: Path,
    client: ClientData,
    info: DatasetInfo,
    fmt: str = "npz",
    with_global: bool = False,
    label_fraction: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write one device's folder in format v1 from its `ClientData`. Images go as uint8 raw
    pixels when they are exactly that (always for the registry's datasets), else as float32
    (npz only). Unlabelled training images get label -1 (npz) or go to `train/unlabelled/`."""
    if fmt not in ("npz", "imagefolder"):
        raise ValueError(f"format '{fmt}': use npz or imagefolder")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"'{out_dir}' exists and is not empty")
    pixel_max = info.pixel_max
    train_y = torch.where(client.train_labelled, client.train_y, UNLABELLED)
    splits = {"train": (client.train_x, train_y), "test": (client.test_x, client.test_y)}
    if with_global and client.has_global:
        splits["global"] = (client.global_x, client.global_y)
    encoded = {}
    for split, (x, y) in splits.items():
        raw = _as_raw(x, info, pixel_max)
        if raw is None and fmt == "imagefolder" and split != "global":
            raise ValueError(f"{split} images are not raw 8-bit pixels: use --format npz")
        encoded[split] = (raw if raw is not None else x.numpy(), y.numpy().astype(np.int64))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "npz":
            arrays = {
                f"{s}_{k}": v
                for s, pair in encoded.items()
                for k, v in zip("xy", pair, strict=True)
            }
            write_npz_atomic(out_dir / SAMPLES_FILE, arrays)
        else:
            for split in ("train", "test"):
                _write_image_folder(out_dir / split, *encoded[split])
            if "global" in encoded:
                write_npz_atomic(
                    out_dir / SAMPLES_FILE,
                    {"global_x": encoded["global"][0], "global_y": encoded["global"][1]},
                )
        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": info.name,
            "class_names": list(info.class_names),
            "image_shape": list(info.image_shape),
            "mean": list(info.mean),
            "std": list(info.std),
            "background": list(info.background),
            "pixel_max": pixel_max,
        }
        if label_fraction is not None:
            meta["label_fraction"] = label_fraction
        if provenance:
            meta["provenance"] = provenance
        write_json_atomic(out_dir / METADATA_FILE, meta)  # last: a folder without it is unfinished
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _write_image_folder(root: Path, raw: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    digits = max(6, len(str(len(labels))))
    for i, (pixels, label) in enumerate(zip(raw, labels, strict=True)):
        folder = root / (UNLABELLED_DIR if label == UNLABELLED else str(int(label)))
        folder.mkdir(parents=True, exist_ok=True)
        image = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{i:0{digits}d}.png")
