"""Proximal personal experts (`expert.proximal`): a personal expert fine-tuned from the shared
expert with a pull towards it keeps what the shared one knows of classes its owner lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe.models import Expert
from nmoe.training import train_classifier

from .live import fine_tuned_from_shared

DIM, CLASSES = 16, 6


def _clusters(classes: list[int], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian feature clusters, one centre per class (the same centres for every seed)."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), DIM, generator=generator), y


def _accuracy(expert: Expert, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((expert(x).argmax(dim=1) == y).float().mean())


def _personal(shared: Expert, proximal: float) -> Expert:
    expert = Expert(DIM, 32, CLASSES)
    expert.load_state_dict(shared.state_dict())
    x, y = _clusters([0, 1], 40, seed=2)  # the owner holds two of the six classes
    train_classifier(expert, x, y, epochs=30, lr=0.05, batch_size=16, seed=3, proximal=proximal)
    return expert


def test_a_proximal_expert_keeps_the_classes_its_owner_lacks() -> None:
    torch.manual_seed(0)
    shared = Expert(DIM, 32, CLASSES)
    x, y = _clusters(list(range(CLASSES)), 50, seed=1)
    train_classifier(shared, x, y, epochs=30, lr=0.01, batch_size=32, seed=1)
    own_x, own_y = _clusters([0, 1], 50, seed=4)
    other_x, other_y = _clusters([2, 3, 4, 5], 50, seed=5)
    assert _accuracy(shared, other_x, other_y) > 0.9
    plain, proximal = _personal(shared, 0.0), _personal(shared, 1.0)
    assert _accuracy(plain, own_x, own_y) > 0.95 and _accuracy(proximal, own_x, own_y) > 0.95
    assert _accuracy(plain, other_x, other_y) < 0.5  # plain fine-tuning forgets them
    assert _accuracy(proximal, other_x, other_y) > 0.9


def test_the_proximal_pull_needs_a_shared_start() -> None:
    from nmoe.config import ConfigError, compose_config

    with pytest.raises(ConfigError, match="'expert.proximal'"):
        compose_config(["expert.proximal=0.5"])  # the default expert starts from scratch
    with pytest.raises(ConfigError, match="'expert.proximal'"):
        compose_config(["experiment=digits_default", "expert.proximal=-1"])


def _personal_after(tmp_path: Path, proximal: float) -> dict[str, np.ndarray]:
    live = fine_tuned_from_shared(tmp_path, [f"expert.proximal={proximal}"])
    shared = {k: v.numpy() for k, v in live.context.state["model/shared_expert"].items()}
    personal = {k: v.numpy() for k, v in live.context.state["model/expert"].items()}
    return {k: personal[k] - shared[k] for k in shared}


def test_the_client_applies_the_configured_proximal_weight(
    tmp_path: Path, task_identity: None
) -> None:
    """Same data, same start: a strong pull keeps the personal expert near the shared one."""
    drift = {
        p: float(np.sqrt(sum((d**2).sum() for d in _personal_after(tmp_path / str(p), p).values())))
        for p in (0.0, 10.0)
    }
    assert drift[10.0] < 0.3 * drift[0.0]
