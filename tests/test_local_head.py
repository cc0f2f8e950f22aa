"""The local head (`expert.local_head`): beside its proximal expert, a device fine-tunes a plain
head from the same shared expert (no pull) on every labelled image (none held out for a gate);
that head answers the rows local-first keeps on the device and is what `local_expert` reports,
while peers and the gates get the proximal expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from client_app.node import open_node
from client_app.state import PersonalState, read_state_file
from nmoe.models import build_expert, load_numpy, state_numpy
from nmoe.pipeline import plan_query
from nmoe.training import train_classifier
from nmoe_protocol import messages as wire

from .live import LiveNode, fine_tuned_from_shared, route_request, simulate

HEAD, EXPERT = "model/local_head", "model/expert"


def _group(live: LiveNode, name: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in live.context.state[name].items()}


def _local_accuracies(live: LiveNode, methods: list[str]) -> list[float]:
    reply = live.send(wire.EvaluateRequest(methods=methods))
    assert not reply.has_error(), reply.error.reason
    return wire.Accuracies.from_message(reply).acc_local


def _fine_tuned_by_hand(live: LiveNode, module: torch.nn.Module) -> torch.nn.Module:
    """`module` trained as stage 2 trains a local head: no pull, every labelled image, the
    expert's schedule and seed."""
    node = open_node(live.context)
    x, y = node.split("train")
    ex = live.cfg.expert
    train_classifier(
        module,
        node.features(x),
        y,
        epochs=int(ex.epochs),
        lr=float(ex.lr),
        batch_size=int(ex.batch_size),
        seed=node.seed(3),
    )
    return module


def test_the_local_head_is_a_plain_fine_tuning_on_every_labelled_image(
    tmp_path: Path, task_identity: None
) -> None:
    """The local head is exactly H_0 fine-tuned without pull on every labelled image with the
    expert's schedule; it is saved to disk with the proximal expert, and the evaluation reports
    it as `local_head` beside the expert's `local_expert` (here the pull is so strong that the
    expert stays the random shared one)."""
    live = fine_tuned_from_shared(tmp_path, ["expert.proximal=1000", "expert.local_head=true"])
    assert float(live.cfg.expert.gate_holdout_fraction) > 0  # the expert holds images out
    node = open_node(live.context)
    _, y = node.split("train")
    assert len(y) > len(node.split("expert")[1])
    reference = _fine_tuned_by_hand(live, _module(live, "model/shared_expert"))
    head, expert = _group(live, HEAD), _group(live, EXPERT)
    for key, value in state_numpy(reference).items():
        np.testing.assert_array_equal(head[key], value)
    assert max(float(np.abs(expert[k] - head[k]).max()) for k in head) > 1e-3
    (saved,) = live.state_dir.rglob("*.safetensors")
    assert set(read_state_file(saved)) >= {HEAD, EXPERT}
    expert_acc, head_acc = _local_accuracies(live, ["local_expert", "local_head"])
    test_x, test_y = node.split("test")
    with torch.no_grad():
        by_hand = float((reference(node.features(test_x)).argmax(1) == test_y).float().mean())
    assert head_acc == pytest.approx(by_hand)
    assert expert_acc < head_acc - 0.1
    del live.context.state[HEAD]
    reply = live.send(wire.EvaluateRequest(methods=["local_head"]))
    assert reply.has_error() and "no local head" in reply.error.reason


def test_a_node_without_local_head_drops_one_kept_from_earlier(
    tmp_path: Path, task_identity: None
) -> None:
    """A head left by an earlier training must not answer for a new expert."""
    live = LiveNode(tmp_path, ["expert=with_shared", "expert.init_from_shared=true"])
    shared = state_numpy(build_expert(live.cfg.model, 10, 321))
    replies = [
        live.send(request)
        for request in (
            wire.SetupRequest(config_json=live.cfg_json),
            wire.InstallRequest(part="fe", params=live.params),
            wire.InstallRequest(part="shared_expert", params=shared),
        )
    ]
    assert not any(r.has_error() for r in replies)
    PersonalState(live.context).put(HEAD, shared)
    reply = live.send(wire.ExpertRequest(init="shared"))
    assert not reply.has_error(), reply.error.reason
    assert HEAD not in live.context.state.array_records


def test_local_first_rows_get_the_local_head_and_the_others_the_expert() -> None:
    torch.manual_seed(0)
    feats = torch.randn(8, 5)
    expert, head, shared = (torch.nn.Linear(5, 3) for _ in range(3))
    weights = torch.full((8, 3), 1 / 3)
    local = torch.tensor([True, False] * 4)
    plan = plan_query(feats, weights, {0: expert, 2: shared}, 0, local, head)
    with torch.no_grad():
        torch.testing.assert_close(plan.local_logits[0][local], head(feats[local]))
        torch.testing.assert_close(plan.local_logits[0][~local], expert(feats[~local]))
        torch.testing.assert_close(plan.local_logits[2], shared(feats))
    assert torch.equal(plan.weights[local], torch.tensor([[1.0, 0.0, 0.0]]).expand(4, -1))
    assert torch.equal(plan.weights[~local], weights[~local])
    assert list(plan.remote_index) == [1]
    assert torch.equal(plan.remote_index[1], torch.nonzero(~local).flatten())


def test_the_local_head_needs_a_proximal_expert_or_stage1s_head() -> None:
    from nmoe.config import ConfigError, compose_config

    from_h0 = ["experiment=digits_default", "expert.local_head_init=shared_expert"]
    with pytest.raises(ConfigError, match="'expert.local_head'"):
        compose_config([*from_h0, "expert.proximal=0", "expert.local_head=true"])
    cfg = compose_config(["experiment=digits_default"]).expert
    assert bool(cfg.local_head) and cfg.local_head_init == "stage1"
    compose_config(["experiment=digits_default", "expert.proximal=0"])  # stage 1's head: no pull
    with pytest.raises(ConfigError, match="'expert.local_head_init'"):  # FedSC trains no head
        compose_config(["experiment=digits_default", "fe=fedsc", "expert.shared_model=expert"])
    with pytest.raises(ConfigError, match="'expert.local_head_init'"):
        compose_config(["experiment=digits_default", "expert.local_head_init=h0"])


def test_a_local_head_from_stage1_is_stage1s_head_fine_tuned(
    tmp_path: Path, task_identity: None
) -> None:
    """With `expert.local_head_init=stage1` (digits_default) the local head is stage 1's installed
    head fine-tuned without pull on every labelled image with the expert's schedule (FedRep's
    personal head); the node builds it in that shape, and it is what `local_head` reports."""
    live = fine_tuned_from_shared(
        tmp_path, ["expert.proximal=1.0", "expert.local_head=true", "expert.local_head_init=stage1"]
    )
    node = open_node(live.context)
    reference = _fine_tuned_by_hand(live, node.installed_bundle().head)
    head = _group(live, HEAD)
    assert set(head) == set(state_numpy(reference))
    for key, value in state_numpy(reference).items():
        np.testing.assert_array_equal(head[key], value)
    held = node.local_head()
    assert isinstance(held, torch.nn.Linear)
    assert not torch.equal(held.weight, node.installed_bundle().head.weight)  # trained, not F's
    (head_acc,) = _local_accuracies(live, ["local_head"])
    test_x, test_y = node.split("test")
    with torch.no_grad():
        by_hand = float((reference(node.features(test_x)).argmax(1) == test_y).float().mean())
    assert head_acc == pytest.approx(by_hand)


@pytest.mark.parametrize("own_model", ["local_head", "head_and_expert"])
def test_wave_one_answers_the_rows_kept_on_the_device_with_its_own_model(
    tmp_path: Path, task_identity: None, own_model: str
) -> None:
    """A device routes its own training images (every one local-first): the logits it keeps for
    its own slot are its own model's (`expert.own_model`): its local head's, or logits whose
    probabilities are the mean of the head's and the proximal expert's; never the expert's."""
    live = fine_tuned_from_shared(
        tmp_path,
        [
            "expert.proximal=1000",
            "expert.local_head=true",
            f"expert.own_model={own_model}",
            "gate.local_first_quantile=1.0",
            "gate.local_first_class_confidence=0",
            "seal_payloads=false",
        ],
    )
    reply = live.send(route_request(splits=["train"]))
    assert not reply.has_error(), reply.error.reason
    kept = _group(live, "scratch/pending.q")
    node_feats = _features(live, "train")
    with torch.no_grad():
        head, expert = (_module(live, name)(node_feats) for name in (HEAD, EXPERT))
    probs = torch.softmax(torch.from_numpy(kept["local.0"]), dim=1)
    want = torch.softmax(head, dim=1)
    if own_model == "head_and_expert":
        want = (want + torch.softmax(expert, dim=1)) / 2
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-6)
    assert (probs - torch.softmax(expert, dim=1)).abs().max() > 1e-2
    assert (kept["weights"][:, 0] == 1).all()


def test_the_evaluation_reports_the_own_model_as_the_mean_of_head_and_expert(
    tmp_path: Path, task_identity: None
) -> None:
    """`own_model` is scored with the mean of the local head's and the expert's probabilities.
    Here each model answers one distribution whatever the row: the head 0.5 on the device's
    commonest test class a and 0.45 on a third class c, the expert 0.5 on its second class b and
    0.45 on c. Each alone picks its own class, their mean picks c: three different accuracies,
    each the share of its class in the local test."""
    live = fine_tuned_from_shared(
        tmp_path,
        ["expert.proximal=1000", "expert.local_head=true", "expert.own_model=head_and_expert"],
    )
    _, test_y = open_node(live.context).split("test")
    a, b, c = torch.bincount(test_y, minlength=10).argsort(descending=True)[:3].tolist()
    for group, top in ((HEAD, a), (EXPERT, b)):
        probs = torch.full((10,), 0.05 / 8)
        probs[top], probs[c] = 0.5, 0.45
        live.context.state[group] = ArrayRecord(
            {k: Array(v) for k, v in _answers_always(live, probs).items()}
        )
    accuracies = _local_accuracies(live, ["local_head", "local_expert", "own_model"])
    shares = [float((test_y == k).float().mean()) for k in (a, b, c)]
    assert accuracies == pytest.approx(shares)
    assert len(set(shares)) == 3, shares  # the check tells the three models apart


def _answers_always(live: LiveNode, probs: torch.Tensor) -> dict[str, np.ndarray]:
    """An expert's parameters whose output is log(probs) on every row: a zero last layer."""
    module = build_expert(live.cfg.model, 10, 0)
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(probs.log())
    return state_numpy(module)


def test_the_own_model_is_a_known_choice() -> None:
    from nmoe.config import ConfigError, compose_config

    assert compose_config(["experiment=digits_default"]).expert.own_model == "head_and_expert"
    with pytest.raises(ConfigError, match="'expert.own_model'"):
        compose_config(["experiment=digits_default", "expert.own_model=expert"])


def _module(live: LiveNode, group: str) -> torch.nn.Module:
    module = build_expert(live.cfg.model, 10, 0)
    load_numpy(module, _group(live, group))
    return module


def _features(live: LiveNode, split: str) -> torch.Tensor:
    node = open_node(live.context)
    return node.features(node.split(split)[0])


def test_a_run_reports_the_local_head_beside_the_expert(tmp_path: Path) -> None:
    """With `expert.local_head`, results.json has `local_head` per client beside `local_expert`,
    and both differ; without it, no `local_head`; with `expert.own_model=head_and_expert` also
    `own_model`, their mean."""
    common = [
        "experiment=smoke",
        "simulation.num_clients=2",
        "fe.rounds=2",
        "expert=with_shared",
        "expert.init_from_shared=true",
        "expert.shared_rounds=1",
        "gate=rangate",
        "baselines=[]",
    ]
    on = simulate(tmp_path / "on", [*common, "expert.proximal=1000", "expert.local_head=true"])
    mean = simulate(
        tmp_path / "mean",
        [
            *common,
            "expert.proximal=1000",
            "expert.local_head=true",
            "expert.own_model=head_and_expert",
        ],
    )
    off = simulate(tmp_path / "off", [*common, "expert.proximal=1000"])
    head, expert = on["accuracy"]["local_head"], on["accuracy"]["local_expert"]
    assert len(head["per_client"]) == 2 and head["per_client"] != expert["per_client"]
    assert expert == off["accuracy"]["local_expert"]  # the expert is the same with or without
    assert "local_head" not in off["accuracy"]
    assert "own_model" not in on["accuracy"]  # the own model is the head: reported as local_head
    assert mean["accuracy"]["local_head"] == head and "own_model" in mean["accuracy"]


@pytest.mark.usefixtures("task_identity")
def test_a_resumed_run_trains_the_heads_its_nodes_lack(tmp_path: Path) -> None:
    """A run resumed on nodes that hold their experts but no local head (state saved without
    one) trains stage 2 again instead of skipping it, so the heads it is configured with exist."""
    from nmoe.config import compose_config
    from server_app.app import run_job

    from .live import RelayGrid, live_fleet

    overrides = [
        "seal_payloads=false",
        "expert=with_shared",
        "expert.init_from_shared=true",
        "expert.proximal=1.0",
        "expert.local_head=true",
    ]
    nodes = live_fleet(tmp_path, overrides)

    def job(name: str, *extra: str) -> list[str]:
        base = ["experiment=smoke", "gate=rangate", "partition=iid", "baselines=[]", "fe.rounds=1"]
        return [
            *base,
            *overrides,
            "expert.shared_rounds=1",
            f"output_dir={tmp_path / name}",
            *extra,
        ]

    first = run_job(RelayGrid(nodes), compose_config(job("first")))
    assert "local_head" in first["accuracy"]
    for live in nodes.values():  # as if saved by a version without local heads
        del live.context.state[HEAD]
        PersonalState(live.context).persist()
    second = run_job(
        RelayGrid(nodes), compose_config(job("second", f"resume={tmp_path / 'first'}"))
    )
    assert "expert" in second["wall_time_s"]  # stage 2 ran again
    assert second["accuracy"]["local_head"] == first["accuracy"]["local_head"]
    assert all(HEAD in live.context.state.array_records for live in nodes.values())
