"""One small in-process run through the less travelled paths: CIFAR-10 from a local folder,
the ResNet extractor, FedSC with shared (noisy) correlation matrices, a shared expert, a ring."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from .live import simulate

NUM_CLIENTS = 4
IMAGES_PER_BATCH = 60
CIFAR_SIDE = 32


def write_fake_cifar(root: Path) -> Path:
    """A tiny dataset in torchvision's CIFAR-10 format: class-dependent colour + noise."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, IMAGES_PER_BATCH)
        base = (labels[:, None] * 25).astype(np.int64)
        data = np.clip(
            base + rng.integers(0, 40, (IMAGES_PER_BATCH, 3 * CIFAR_SIDE * CIFAR_SIDE)), 0, 255
        )
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": data.astype(np.uint8), "labels": labels.tolist()}, handle)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data_root = write_fake_cifar(tmp_path_factory.mktemp("cifar"))
    return simulate(
        tmp_path_factory.mktemp("out"),
        [
            "experiment=smoke",
            "dataset=cifar10",
            f"dataset.path={data_root}",
            "model=resnet",
            "model.resnet_width=4",
            "model.feature_dim=16",
            "model.projector_dim=8",
            "fe=fedsc",
            "fe.rounds=2",
            "baseline.fedavg_rounds=2",
            "fe.share_correlation=true",
            "fe.correlation_noise=0.01",
            "fe.correlation_passes=1",
            "dataset.label_fraction=0.5",
            "expert=with_shared",
            "expert.shared_rounds=2",
            "topology=ring",
            "gate=fedgate",
            "gate.sync_head_every=1",
            "partition=iid",
            "baselines=[fedavg]",
            f"simulation.num_clients={NUM_CLIENTS}",
        ],
    )


def test_run_completes_on_cifar_with_resnet_and_fedsc(results: dict) -> None:
    assert results["status"] == "completed"
    assert (
        results["config"]["dataset"]["name"] == "cifar10"
        and results["config"]["model"]["extractor"] == "resnet"
    )
    probe = [h["probe-acc"] for h in results["history"] if h["stage"] == "fe_sc"]
    assert len(probe) == 2 and all(0.0 <= p <= 1.0 for p in probe)
    # the probe's reference row (random init), the final F's probe and the protocol
    extra = results["extra"]["probe"]
    assert 0.0 <= extra["random_init"] <= 1.0 and 0.0 <= extra["fe_sc"] <= 1.0
    assert "standardised" in extra["protocol"]["model"]
    # label_fraction 0.5: the probe trains on the labelled half of the pooled training images
    nodes = results["nodes"]["info"].values()
    assert extra["protocol"]["train_images"] == sum(n["num_labelled"] for n in nodes)
    assert extra["protocol"]["train_images"] < sum(n["num_train"] for n in nodes)
    # the correlation wave of shared FedSC: one per round, its bytes counted with stage 1
    assert results["comm_bytes"]["fe_sc"]["up"] > 0
    for method in ("nmoe", "local_expert", "fedavg"):
        assert len(results["accuracy"][method]["per_client"]) == NUM_CLIENTS


def test_fedavg_baseline_gets_its_own_fedce_stage_under_fedsc(results: dict) -> None:
    assert [h["round"] for h in results["history"] if h["stage"] == "baseline_fedavg"] == [1, 2]
    assert results["comm_bytes"]["baseline_fedavg"]["up"] > 0


def test_shared_expert_is_trained_federatedly_and_routable(results: dict) -> None:
    assert [h["round"] for h in results["history"] if h["stage"] == "shared_expert"] == [1, 2]
    shared_id = NUM_CLIENTS
    counts = results["routing_counts"]["fedgate"]
    assert all(len(row) == NUM_CLIENTS + 1 for row in counts.values())
    neighbours = results["topology"]["neighbours"]
    for client, row in counts.items():  # a ring: nobody routes beyond its two neighbours (+ H_0)
        reachable = set(neighbours[int(client)]) | {shared_id}
        assert all(n == 0 for e, n in enumerate(row) if e not in reachable)


def test_correlation_sharing_costs_bytes(results: dict) -> None:
    """F + projector travel both ways; correlation matrices go up with them and come back
    averaged."""
    fe = results["comm_bytes"]["fe_sc"]
    assert fe["down"] > fe["up"] * 0.9  # the round-2 messages carry the others' average correlation
    assert results["topology"]["kind"] == "ring"
