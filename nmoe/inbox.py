"""A device's inbox and outbox: new inputs in, predictions out, all on the device.

Files land in `<inbox>/` (a PNG, or a `.npy` of raw pixels: (H, W) or (C, H, W) uint8, read
without pickle). Whoever answers a file writes `<outbox>/<file name>.json` (atomically) and moves
the input to `<inbox>/done/`. Hand-offs are renames, so two processes never answer one file:

- the on-device service (`nmoe-device serve`) takes new files from `<inbox>/`: those familiar to
  the device's own data are answered at once by its own expert; the others move to
  `<inbox>/federated/` for the federation;
- a routed serving query (`mode=serve`) claims the files in `<inbox>/federated/` (and those in
  `<inbox>/` that no on-device service took within `UNCLAIMED_GRACE_S` of landing) into
  `<inbox>/claimed/<query>/`, and answers them when its combine wave arrives.

An outbox entry: `{"file", "prediction", "class", "probabilities", "answered_by": "device" |
"federation", "latency_s"}` (latency from the file landing, by its modification time, to its
prediction).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json_atomic
from .datasets import DatasetInfo, normalise

SUFFIXES = (".png", ".npy")
# A file in the inbox itself is the on-device service's for this long (it looks every 0.2 s);
# only then may the federation take it (a device with no service running).
UNCLAIMED_GRACE_S = 2.0
FEDERATED, CLAIMED, DONE, REFUSED = "federated", "claimed", "done", "refused"


@dataclass(frozen=True)
class Item:
    """One input: where it is now, its original name, when it landed."""

    path: Path
    landed: float


class Inbox:
    """The folders of one device (see the module docstring)."""

    def __init__(self, inbox: Path, outbox: Path, info: DatasetInfo) -> None:
        self.inbox = Path(inbox)
        self.outbox = Path(outbox)
        self.info = info
        for folder in (
            self.inbox,
            self.inbox / FEDERATED,
            self.inbox / CLAIMED,
            self.inbox / DONE,
            self.outbox,
        ):
            folder.mkdir(parents=True, exist_ok=True)

    # --- what is waiting ---------------------------------------------------------------
    def new(self) -> list[Item]:
        """Files that landed in the inbox itself, oldest first."""
        return self._items(self.inbox)

    def federated(self) -> list[Item]:
        """Files waiting for the federation (handed over by the on-device service)."""
        return self._items(self.inbox / FEDERATED)

    def claimed(self, query: str) -> list[Item]:
        return self._items(self.inbox / CLAIMED / query)

    def _items(self, folder: Path) -> list[Item]:
        if not folder.is_dir():
            return []
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
        return sorted(
            (Item(p, p.stat().st_mtime) for p in files), key=lambda i: (i.landed, i.path.name)
        )

    # --- hand-offs ------------------------------------------------------------------------
    def defer(self, item: Item) -> Item:
        """Hand a file over to the federation."""
        return _move(item, self.inbox / FEDERATED)

    def claim(self, query: str, limit: int) -> list[Item]:
        """Claim up to `limit` waiting files for one routed query; a file that is not a valid
        image is set aside in `refused/` with an error entry in the outbox, never batched."""
        folder = self.inbox / CLAIMED / query
        folder.mkdir(parents=True, exist_ok=True)
        landed_before = time.time() - UNCLAIMED_GRACE_S  # the device service's turn first
        fresh = [i for i in self.new() if i.landed <= landed_before]
        waiting = sorted(self.federated() + fresh, key=_order)[:limit]
        return sorted((_move(item, folder) for item in self.admit(waiting)), key=_order)

    def admit(self, items: list[Item]) -> list[Item]:
        """The items that read as valid images; the others are refused (outbox error entry)."""
        good = []
        for item in items:
            try:
                _read_image(item.path, tuple(self.info.image_shape), self.info.pixel_max)
                good.append(item)
            except (ValueError, OSError) as err:
                entry = {"file": item.path.name, "error": str(err)}
                write_json_atomic(self.outbox / f"{item.path.name}.json", entry)
                _move(item, self.inbox / REFUSED)
        return good

    def release(self, query: str) -> None:
        """Give a claimed query's files back to the federation (its combine never came)."""
        for item in self.claimed(query):
            _move(item, self.inbox / FEDERATED)

    # --- reading and answering ---------------------------------------------------------
    def read(self, items: list[Item]) -> torch.Tensor:
        """The images, normalised as the dataset's (N, C, H, W) float32."""
        shape = tuple(self.info.image_shape)
        images = (
            np.stack([_read_image(i.path, shape, self.info.pixel_max) for i in items])
            if items
            else np.zeros((0, *shape), np.uint8)
        )
        return torch.from_numpy(
            normalise(images, self.info.mean, self.info.std, self.info.pixel_max)
        )

    def answer(
        self, items: list[Item], probabilities: torch.Tensor, answered_by: str
    ) -> list[Path]:
        """Write each item's prediction to the outbox, then move the input to `done/`."""
        written = []
        for item, probs in zip(items, probabilities, strict=True):
            prediction = int(probs.argmax())
            entry = {
                "file": item.path.name,
                "prediction": prediction,
                "class": self.info.class_names[prediction],
                "probabilities": [round(float(p), 6) for p in probs],
                "answered_by": answered_by,
                "latency_s": round(time.time() - item.landed, 4),
            }
            written.append(write_json_atomic(self.outbox / f"{item.path.name}.json", entry))
            _move(item, self.inbox / DONE)
        return written


def _order(item: Item) -> tuple[float, str]:
    """Oldest first, then by name: the order a query reads its files in and answers them."""
    return item.landed, item.path.name


def _move(item: Item, folder: Path) -> Item:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / item.path.name
    item.path.rename(target)
    return Item(target, item.landed)


def _read_image(path: Path, shape: tuple[int, ...], pixel_max: int) -> np.ndarray:
    """Raw pixels (C, H, W) of a PNG or a `.npy` (no pickle), checked against the shape and the
    dataset's raw pixel range (integers in [0, pixel_max])."""
    if path.suffix.lower() == ".npy":
        pixels = np.load(path, allow_pickle=False)
        if not np.issubdtype(pixels.dtype, np.integer):
            raise ValueError(f"{path.name}: dtype {pixels.dtype}, expected raw integer pixels")
        if pixels.size and (pixels.min() < 0 or pixels.max() > pixel_max):
            raise ValueError(f"{path.name}: pixel values outside [0, {pixel_max}]")
    else:
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if shape[0] == 1 else "RGB"))
    if pixels.ndim == 2:
        pixels = pixels[None]
    elif pixels.ndim == 3 and pixels.shape[-1] == shape[0] and pixels.shape[0] != shape[0]:
        pixels = pixels.transpose(2, 0, 1)
    if tuple(pixels.shape) != shape:
        raise ValueError(f"{path.name}: image of shape {pixels.shape}, expected {shape}")
    return pixels


def read_outbox(outbox: Path) -> dict[str, dict]:
    """Every prediction in an outbox, by input file name."""
    return {
        json.loads(p.read_text())["file"]: json.loads(p.read_text())
        for p in sorted(Path(outbox).glob("*.json"))
    }
