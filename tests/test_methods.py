"""The method space, on real small computations (no mocks).

1. FedSC's loss reaches F (its formulation: tests/test_ssl.py); norm clipping.
2. FedSC in a small federated loop (local SSL + parameter averaging) on digits: linear probe.
3. The hybrid objective CE + lambda * SSL.
4. Topologies: full, ring, random d-regular, random geometric.
5. Routing never reaches a masked expert.
6. RollGate through a real in-process Flower simulation; gate training on cached logits.
7. CIFAR-10 from a local torchvision-format folder; clear errors when it is missing; ResNet F.
"""

from __future__ import annotations

import json
import pickle
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe.augment import ssl_augmentation
from nmoe.config import compose_config
from nmoe.data import (
    DatasetUnavailableError,
    federation_spec,
    load_all_clients,
    load_arrays,
    load_cifar10_folder,
    load_cifar10_hf,
)
from nmoe.losses import clip_embeddings, fedsc_loss
from nmoe.models import build_bundle, build_extractor, build_gate
from nmoe.probe import linear_probe
from nmoe.routing import random_weights, topk_weights
from nmoe.ssl import ssl_validation_loss
from nmoe.topology import build_graph, describe, neighbour_sets
from nmoe.training import forward_batched, gate_weights, train_extractor, train_gate

DIGITS_SHAPE = (1, 8, 8)


# ---------------------------------------------------------------------------- 1. loss
# (the loss against the reference's formulation, values and gradients: tests/test_ssl.py)


def test_spectral_loss_gradient_reaches_the_feature_extractor():
    cfg = compose_config(["fe=fedsc"])
    bundle = build_bundle(cfg.model, DIGITS_SHAPE, 10, seed=0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, *DIGITS_SHAPE, generator=gen)
    view1 = x + 0.1 * torch.randn(x.shape, generator=gen)
    view2 = x + 0.1 * torch.randn(x.shape, generator=gen)
    z1, z2 = bundle.projector(bundle.fe(view1)), bundle.projector(bundle.fe(view2))
    fedsc_loss(z1, z2, mu=float(cfg.fe.mu))[0].backward()
    for name, param in bundle.fe.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, (
            f"no gradient in fe.{name}"
        )
    for name, param in bundle.head.named_parameters():
        assert param.grad is None, f"the CE head takes no part in the SSL loss (head.{name})"


def test_clip_embeddings_caps_row_norms():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    clipped = clip_embeddings(z, 1.0)
    norms = clipped.norm(dim=1)
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0, 1.0]), atol=1e-6)
    assert torch.equal(clipped[1], z[1]), "rows under the cap are left as they are"
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8]))  # direction kept
    assert torch.allclose(clipped[3], torch.tensor([-0.6, 0.8]))
    big = torch.randn(50, 8, generator=torch.Generator().manual_seed(3)) * 10
    assert float(clip_embeddings(big, 2.5).norm(dim=1).max()) <= 2.5 + 1e-5


# ---------------------------------------------------------------------------- 2. FedSC
def _digits_clients(num_clients: int, extra: list[str]):
    cfg = compose_config(["partition=iid", f"simulation.num_clients={num_clients}", *extra])
    return cfg, load_all_clients(federation_spec(cfg), num_clients)


def _probe(bundle, clients) -> float:
    """The server's protocol: linear probe on pooled training features, scored on the global
    test set."""
    x = torch.cat([c.train_x for c in clients])
    y = torch.cat([c.train_y for c in clients])
    gx, gy = clients[0].global_x, clients[0].global_y
    return linear_probe(forward_batched(bundle.fe, x), y, forward_batched(bundle.fe, gx), gy)


def _stage1_args(fe) -> dict:
    return dict(
        lr=float(fe.lr),
        momentum=float(fe.momentum),
        batch_size=int(fe.batch_size),
        mu=float(fe.mu),
        weight_decay=float(fe.weight_decay),
        grad_clip=float(fe.grad_clip),
    )


def test_fedsc_federated_loop_learns_features():
    cfg, clients = _digits_clients(3, ["fe=fedsc"])
    fe = cfg.fe
    assert float(fe.mu) == 4.0 and float(fe.weight_decay) == 5e-4 and float(fe.grad_clip) == 3.0
    augment = ssl_augmentation("digits", DIGITS_SHAPE, -0.81)
    initial = build_bundle(cfg.model, DIGITS_SHAPE, 10, seed=0)
    global_bundle = build_bundle(cfg.model, DIGITS_SHAPE, 10, seed=0)
    for rnd in range(2):
        states = []
        for pid, client in enumerate(clients):
            local = build_bundle(cfg.model, DIGITS_SHAPE, 10, seed=0)
            local.load_state_dict(global_bundle.state_dict())
            result = train_extractor(
                local,
                client.train_x,
                client.train_y,
                method="fedsc",
                epochs=int(fe.local_epochs),
                seed=100 * rnd + pid,
                augment=augment,
                **_stage1_args(fe),
            )
            assert np.isfinite(result.loss) and result.ce_loss == 0.0
            # FedSC trains F and the projector, never the CE head
            for key, value in global_bundle.state_dict().items():
                moved = not torch.equal(value, local.state_dict()[key])
                assert moved == (not key.startswith("head.")), key
            states.append(local.state_dict())
        global_bundle.load_state_dict(
            {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}
        )

    # the SSL objective improved on images no client trained on (fixed augmented views)
    gx, mu = clients[0].global_x, float(fe.mu)
    before = ssl_validation_loss(initial, gx, augment, mu=mu, seed=123)
    after = ssl_validation_loss(global_bundle, gx, augment, mu=mu, seed=123)
    print(f"held-out FedSC loss: random init {before:.4f} -> FedSC {after:.4f}")
    assert after < before - 0.1
    probe_fedsc = _probe(global_bundle, clients)
    print(f"linear probe on the global test: FedSC {probe_fedsc:.4f}")
    assert probe_fedsc >= 0.5  # chance is 0.1


# ---------------------------------------------------------------------------- 3. hybrid
def test_hybrid_objective_is_ce_plus_weighted_ssl():
    cfg, clients = _digits_clients(3, ["fe=hybrid"])
    fe, client = cfg.fe, clients[0]
    weight = float(fe.ssl_weight)
    assert weight == 0.5
    augment = ssl_augmentation("digits", DIGITS_SHAPE, -0.81)
    bundle = build_bundle(cfg.model, DIGITS_SHAPE, 10, seed=0)
    results = [
        train_extractor(
            bundle,
            client.train_x,
            client.train_y,
            method="hybrid",
            epochs=1,
            seed=epoch,
            ssl_weight=weight,
            augment=augment,
            **_stage1_args(fe),
        )
        for epoch in range(3)
    ]
    for r in results:
        assert r.ce_loss > 0
        assert r.ssl_loss < 0  # the spectral loss is negative once the two views' embeddings align
        assert r.loss == pytest.approx(r.ce_loss + weight * r.ssl_loss, rel=1e-6)
    assert results[-1].ce_loss < results[0].ce_loss
    assert results[-1].loss < results[0].loss
    with pytest.raises(ValueError, match="augmentation"):
        train_extractor(
            bundle, client.train_x, client.train_y, method="hybrid", epochs=1, seed=0,
            **_stage1_args(fe),
        )  # fmt: skip


# ---------------------------------------------------------------------------- 4. topology
def _symmetric(sets: list[list[int]]) -> bool:
    return all(i in sets[j] for i, nb in enumerate(sets) for j in nb)


def _connected(sets: list[list[int]]) -> bool:
    seen, todo = {0}, deque([0])
    while todo:
        for j in sets[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(sets)


def _check_basic(sets: list[list[int]], n: int) -> None:
    assert len(sets) == n
    for i, nb in enumerate(sets):
        assert i in nb, f"client {i} must reach its own expert"
        assert nb == sorted(set(nb)) and all(0 <= j < n for j in nb)


def test_topology_full():
    cfg = compose_config(["topology=full"])
    for n in (1, 2, 5, 8):
        sets = neighbour_sets(cfg.topology, n, 0)
        _check_basic(sets, n)
        assert all(nb == list(range(n)) for nb in sets)
        assert describe(cfg.topology, n, 0)["connected"] is True


def test_topology_ring():
    cfg = compose_config(["topology=ring"])
    for n in (3, 4, 7):
        sets = neighbour_sets(cfg.topology, n, 0)
        _check_basic(sets, n)
        assert all(len(nb) == 3 for nb in sets)
        assert _symmetric(sets)
        assert all(sorted({(i - 1) % n, i, (i + 1) % n}) == nb for i, nb in enumerate(sets))
        summary = describe(cfg.topology, n, 0)
        assert (
            summary["kind"] == "ring"
            and summary["degrees"] == [2] * n
            and summary["connected"] is True
        )
    assert neighbour_sets(cfg.topology, 2, 0) == [[0, 1], [0, 1]]


def test_topology_regular():
    cfg = compose_config(["topology=regular", "topology.degree=3"])
    for n in (4, 6, 8, 10):
        sets = neighbour_sets(cfg.topology, n, 5)
        _check_basic(sets, n)
        assert all(len(nb) == 4 for nb in sets)
        assert _symmetric(sets)
        assert describe(cfg.topology, n, 5)["degrees"] == [3] * n
    assert neighbour_sets(cfg.topology, 10, 5) == neighbour_sets(cfg.topology, 10, 5)
    assert len({json.dumps(neighbour_sets(cfg.topology, 10, seed)) for seed in range(5)}) > 1
    for n in (3, 5):  # degree >= clients, or degree * clients odd
        with pytest.raises(ValueError, match=r"topology\.degree"):
            neighbour_sets(cfg.topology, n, 0)
    with pytest.raises(ValueError, match=r"topology\.degree"):
        build_graph(compose_config(["topology=regular", "topology.degree=6"]).topology, 6, 0)


def test_topology_geometric():
    cfg = compose_config(["topology=geometric", "topology.radius=0.35"])
    outcomes = set()
    for n in (6, 10, 14):
        for seed in range(4):
            sets = neighbour_sets(cfg.topology, n, seed)
            _check_basic(sets, n)
            assert _symmetric(sets)
            assert neighbour_sets(cfg.topology, n, seed) == sets
            summary = describe(cfg.topology, n, seed)
            assert summary["degrees"] == [len(nb) - 1 for nb in sets]
            assert summary["connected"] is _connected(sets)
            outcomes.add(summary["connected"])
    assert outcomes == {True, False}, (
        "the cases above should include connected and disconnected graphs"
    )
    far = compose_config(
        ["topology=geometric", "topology.radius=1.5"]
    )  # > sqrt(2): every pair in range
    assert neighbour_sets(far.topology, 9, 3) == [list(range(9))] * 9
    assert describe(far.topology, 9, 3)["connected"] is True


# ---------------------------------------------------------------------------- 5. routing
def test_routing_never_reaches_a_masked_expert():
    gen = torch.Generator().manual_seed(4)
    num_experts, batch = 7, 32
    for trial in range(200):
        reachable = torch.rand(num_experts, generator=gen) < 0.5
        reachable[trial % num_experts] = True  # the requester's own expert
        r = int(reachable.sum())
        k = 1 + trial % r
        scores = torch.randn(batch, num_experts, generator=gen) * 3
        scores[:, ~reachable] += 100.0  # unreachable experts score best: must still be skipped
        for noise in (0.0, 1.0, 10.0):
            w = topk_weights(scores, reachable, k, noise_std=noise, generator=gen)
            assert torch.all(w[:, ~reachable] == 0)
            assert torch.all((w > 0).sum(dim=1) == k)
            assert torch.allclose(w.sum(dim=1), torch.ones(batch))
        w = random_weights(batch, reachable, k, generator=gen)
        assert torch.all(w[:, ~reachable] == 0)
        assert torch.all((w > 0).sum(dim=1) == k)
        assert torch.allclose(w[w > 0], torch.full(((w > 0).sum(),), 1.0 / k))
    # with k = 1 and no noise the choice is the best reachable score
    reachable = torch.tensor([True, False, True, True])
    scores = torch.tensor([[0.1, 9.0, 0.5, 0.2], [2.0, 9.0, 0.5, 1.0]])
    assert topk_weights(scores, reachable, 1).argmax(dim=1).tolist() == [2, 0]


def test_routing_k_larger_than_neighbourhood_raises():
    reachable = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="k=3"):
        topk_weights(torch.zeros(2, 4), reachable, 3)
    with pytest.raises(ValueError, match="k=3"):
        random_weights(2, reachable, 3)


# ------------------------------------------------------ 6. RollGate (simulation) and gate training
ALL_METHODS = (
    "oracle_router",
    "fedavg",
    "fedavg_task_prior",
    "shared_fe_own_head",
    "local_only",
    "centralized",
    "rangate",
    "rollgate",
    "fedgate",
    "local_expert",
    "nmoe",
)


CONVERGENCE_CAP, PATIENCE = 40, 2


@pytest.fixture(scope="module")
def rollgate_results(tmp_path_factory):
    from .live import simulate

    return simulate(
        tmp_path_factory.mktemp("rollgate"),
        [
            "experiment=smoke",
            "gate=rollgate",
            "gate.roll_order=shuffled",
            "gate.rounds=2",
            "simulation.num_clients=3",
            "partition=iid",
            f"fe.rounds={CONVERGENCE_CAP}",
            f"fe.patience={PATIENCE}",
            "fe.local_epochs=1",
            f"baseline.epochs={CONVERGENCE_CAP}",
            f"baseline.patience={PATIENCE}",
            "baselines=[fedavg,fedavg_task_prior,shared_fe_own_head,local_only,centralized,"
            "rangate,fedgate,oracle_router]",
        ],
    )


def test_rollgate_visits_every_client_once_per_pass(rollgate_results):
    order = rollgate_results["extra"]["rollgate_order"]
    assert len(order) == 2
    for visit in order:
        assert sorted(visit) == [0, 1, 2]
    rows = [row for row in rollgate_results["history"] if row["stage"] == "rollgate"]
    for pas, visit in enumerate(order, start=1):
        assert [row["client"] for row in rows if row["round"] == pas] == visit
    assert len(rows) == 6 and all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    assert not rollgate_results["extra"].get("dropped")
    assert rollgate_results["config"]["gate"]["roll_order"] == "shuffled"


def test_rollgate_run_reports_every_method(rollgate_results):
    for key in ("accuracy", "accuracy_global"):
        table = rollgate_results[key]
        assert set(ALL_METHODS) <= set(table), f"{key} lacks {set(ALL_METHODS) - set(table)}"
        for method in ALL_METHODS:
            values = table[method]["per_client"]
            assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values), (key, method, values)
            assert table[method]["mean"] == pytest.approx(float(np.mean(values)))
        assert table["nmoe"] == table["rollgate"]  # the configured gate is RollGate
    assert rollgate_results["comm_bytes"]["rollgate"]["up"] > 0
    assert rollgate_results["comm_bytes"]["rollgate"]["down"] > 0


def test_train_gate_learns_to_route_on_cached_logits():
    cfg = compose_config(["gate=rollgate"])
    dim, num_experts, num_classes, n = int(cfg.model.feature_dim), 4, 10, 400
    gen = torch.Generator().manual_seed(5)
    group = torch.randint(0, num_experts - 1, (n,), generator=gen)  # expert 3 is out of reach
    centres = torch.randn(num_experts, dim, generator=gen) * 2
    feats = (centres[group] + torch.randn(n, dim, generator=gen)).relu()
    y = torch.randint(0, num_classes, (n,), generator=gen)
    wrong = (y + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
    # expert j knows the label of group j's samples and is confidently wrong elsewhere;
    # the unreachable expert 3 would be right everywhere
    logits = torch.zeros(n, num_experts, num_classes)
    for j in range(num_experts):
        right = (group == j) | (j == 3)
        logits[:, j] = 5.0 * torch.nn.functional.one_hot(torch.where(right, y, wrong), num_classes)
    reachable = torch.tensor([True, True, True, False])
    gate = build_gate(cfg.model, num_experts, seed=0)
    initial = {k: v.clone() for k, v in gate.state_dict().items()}

    def mixture_loss() -> tuple[float, float]:
        w = gate_weights(gate, feats, reachable, int(cfg.gate.k))
        mix = (w.unsqueeze(-1) * logits).sum(dim=1)
        return (
            float(torch.nn.functional.cross_entropy(mix, y)),
            float((w.argmax(dim=1) == group).float().mean()),
        )

    loss_before, routed_before = mixture_loss()
    train_gate(
        gate,
        feats,
        y,
        logits,
        reachable,
        k=int(cfg.gate.k),
        noise_std=float(cfg.gate.noise_std),
        epochs=15,
        lr=float(cfg.gate.lr),
        batch_size=int(cfg.gate.batch_size),
        seed=0,
    )
    loss_after, routed_after = mixture_loss()
    print(
        f"gate: mixture CE {loss_before:.3f} -> {loss_after:.3f}, routed to the right expert "
        f"{routed_before:.3f} -> {routed_after:.3f}"
    )
    assert any(not torch.equal(initial[k], v) for k, v in gate.state_dict().items())
    assert loss_after < 0.8 * loss_before
    assert routed_after > 0.9
    assert float(gate_weights(gate, feats, reachable, 2)[:, 3].abs().max()) == 0.0


# ---------------------------------------------------------------------------- 7. CIFAR-10
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_cifar(root: Path, per_file: int = 40) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(6)
    data, labels = [], []
    for name in CIFAR_FILES:
        pixels = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, per_file)]
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": pixels, "labels": lab, "batch_label": name}, handle)
        data.append(pixels)
        labels.extend(lab)
    return np.concatenate(data), np.asarray(labels)


def test_cifar10_local_folder(tmp_path):
    raw, labels = _write_cifar(tmp_path)
    data = load_cifar10_folder(str(tmp_path))
    assert data.images.shape == (240, 3, 32, 32) and data.images.dtype == np.float32
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, labels)
    assert data.num_classes == 10
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
    rng = np.random.default_rng(7)
    for _ in range(50):
        i, c, h, w = rng.integers(240), rng.integers(3), rng.integers(32), rng.integers(32)
        expected = (raw[i, c * 1024 + h * 32 + w] / 255.0 - CIFAR_MEAN[c]) / CIFAR_STD[c]
        assert data.images[i, c, h, w] == pytest.approx(expected, abs=1e-5)
    # the folder itself works too, and so does the config route with a sample cap
    assert np.array_equal(
        load_cifar10_folder(str(tmp_path / "cifar-10-batches-py")).images, data.images
    )
    cfg = compose_config(["dataset=cifar10", f"dataset.path={tmp_path}", "dataset.max_samples=100"])
    capped = load_arrays(cfg.dataset)
    assert capped.images.shape == (100, 3, 32, 32) and np.array_equal(
        capped.images, data.images[:100]
    )


def test_cifar10_missing_folder_names_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(["dataset=cifar10", f"dataset.path={empty}"])
    with pytest.raises(DatasetUnavailableError) as err:
        load_arrays(cfg.dataset)
    message = str(err.value)
    assert str(empty) in message
    assert "cifar-10-batches-py" in message and "dataset.path" in message


def test_cifar10_hf_offline_names_the_fix(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read these variables once, at import: set their switches too, so that
    # nothing reaches for the network whatever was imported before
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # a relative name must not resolve to a local folder
    with pytest.raises(DatasetUnavailableError, match=r"dataset\.path"):
        load_cifar10_hf("nmoe-tests/no-such-cifar10")


def test_resnet_extractor_on_cifar_shaped_input(tmp_path):
    cfg = compose_config(
        ["dataset=cifar10", "model=resnet", "partition=iid", f"dataset.path={tmp_path}"]
    )
    _write_cifar(tmp_path)
    clients = load_all_clients(federation_spec(cfg), 2)
    assert tuple(clients[0].train_x.shape[1:]) == (3, 32, 32)
    fe = build_extractor(cfg.model, (3, 32, 32))
    out = fe(clients[0].train_x[:5])
    assert out.shape == (5, int(cfg.model.feature_dim)) == (5, 128)
    assert torch.isfinite(out).all() and bool((out >= 0).all())  # ReLU features
    out.sum().backward()
    assert all(p.grad is not None for p in fe.parameters())


def test_stage1_and_baselines_train_until_converged(rollgate_results):
    """With a patience rule, stage 1 stops once its validation accuracy stalls and keeps the best
    round; local_only and centralized stop on their own validation accuracy."""
    stage1 = rollgate_results["extra"]["convergence"]["fe_ce"]
    rounds = [h["round"] for h in rollgate_results["history"] if h["stage"] == "fe_ce"]
    assert rounds == list(range(1, stage1["rounds_run"] + 1))
    assert stage1["best_round"] <= stage1["rounds_run"] <= CONVERGENCE_CAP
    # round r's clients score what they received, round r-1's aggregate: the last aggregate
    # is scored by no round, and a stop comes PATIENCE scored aggregates after the best
    if stage1["stopped_early"]:
        assert stage1["rounds_run"] - 1 - stage1["best_round"] == PATIENCE
    scores = [h["val-score"] for h in rollgate_results["history"] if h["stage"] == "fe_ce"]
    assert stage1["validation"] == scores[1:]
    # the best round is the last gain above min_delta: later rounds may edge past it by less
    best = stage1["best_validation"]
    assert scores[stage1["best_round"]] == pytest.approx(best)
    min_delta = float(rollgate_results["config"]["fe"]["min_delta"])
    assert max(scores[1:]) <= best + min_delta + 1e-9
    for baseline in ("centralized", "local_only"):
        assert rollgate_results["extra"]["convergence"][baseline]["cap"] == CONVERGENCE_CAP


def test_oracle_router_bounds_every_single_expert(rollgate_results):
    """The oracle answers a sample right whenever one reachable expert does: never below the
    client's own expert, on either split."""
    for key in ("accuracy", "accuracy_global"):
        oracle = rollgate_results[key]["oracle_router"]["per_client"]
        own = rollgate_results[key]["local_expert"]["per_client"]
        assert all(o >= e - 1e-9 for o, e in zip(oracle, own, strict=True)), (key, oracle, own)
