"""Stage 1 with server momentum (`fe.server_momentum`, Flower's FedAvgM): the step it takes, its
momentum kept across a crash, the `fedavg` baseline left plain FedAvg, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from nmoe.config import ConfigError, compose_config
from nmoe_protocol.messages import TrainReply
from nmoe_strategy.strategy import SharedKeyStrategy, flower_strategy
from server_app import checkpoint
from server_app.app import run_job

from .live import LiveNode, RelayGrid, ServerDied, dies_in_stage1_round, live_fleet

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py
BETA = 0.5


def _replies(values: list[float]) -> dict[int, tuple[Message, TrainReply]]:
    """One reply per value: key fe.a filled with it, 10 examples each."""
    out = {}
    for pid, value in enumerate(values):
        request = Message(RecordDict(), dst_node_id=pid + 1, message_type="train.extractor")
        reply = TrainReply(params={"fe.a": np.full(3, value, np.float32)}, num_examples=10, loss=1)
        out[pid] = Message(reply.to_content(), reply_to=request), reply
    return out


def _step(strategy: SharedKeyStrategy, rnd: int, w: np.ndarray, values: list[float]) -> np.ndarray:
    outcome = strategy.aggregate(rnd, _replies(values), ["fe.a"], {"fe.a": w})
    assert outcome.params is not None and not outcome.rejected
    return outcome.params["fe.a"]


def test_the_server_steps_along_its_momentum_not_to_the_average() -> None:
    """w1 = w0 - m1 with m1 = w0 - avg1 (the average itself); then m2 = beta m1 + (w1 - avg2)
    and w2 = w1 - m2, in the model's own dtype."""
    strategy = SharedKeyStrategy(flower_strategy("fedavg", server_momentum=BETA))
    w0 = np.zeros(3, np.float32)
    w1 = _step(strategy, 1, w0, [1.0, 3.0])  # average 2
    np.testing.assert_allclose(w1, 2.0)
    w2 = _step(strategy, 2, w1, [3.0, 5.0])  # average 4: m2 = 0.5 (-2) + (2 - 4) = -3
    np.testing.assert_allclose(w2, 5.0)
    assert w2.dtype == np.float32
    np.testing.assert_allclose(strategy.momentum()["fe.a"], -3.0)
    plain = SharedKeyStrategy(flower_strategy("fedavg"))
    np.testing.assert_allclose(_step(plain, 2, w1, [3.0, 5.0]), 4.0)
    assert plain.momentum() == {}


def test_a_restored_momentum_continues_exactly() -> None:
    w0 = np.zeros(3, np.float32)
    first = SharedKeyStrategy(flower_strategy("fedavg", server_momentum=BETA))
    w1 = _step(first, 1, w0, [1.0, 3.0])
    saved = {k: v.copy() for k, v in first.momentum().items()}
    expected = _step(first, 2, w1, [3.0, 5.0])
    second = SharedKeyStrategy(flower_strategy("fedavg", server_momentum=BETA))
    second.restore_momentum(saved)
    np.testing.assert_array_equal(_step(second, 2, w1, [3.0, 5.0]), expected)
    fresh = SharedKeyStrategy(flower_strategy("fedavg", server_momentum=BETA))
    assert not np.allclose(_step(fresh, 2, w1, [3.0, 5.0]), expected)  # the momentum matters


@pytest.mark.parametrize(
    "overrides",
    [["fe.server_momentum=1.0"], ["fe.server_momentum=-0.1"]]
    + [["fe.server_momentum=0.9", f"aggregation={a}"] for a in ("median", "trimmed_mean")],
)
def test_a_momentum_outside_0_1_or_with_a_robust_aggregation_is_refused(overrides) -> None:
    with pytest.raises(ConfigError, match="fe.server_momentum"):
        compose_config(["experiment=smoke", *overrides])


# --------------------------------------------------------------------------- live runs
LIVE = [
    "seal_payloads=false",
    "fe.rounds=4",
    "fe.patience=10",
    "fe.min_delta=0",
    "partition=iid",
    "gate=rangate",
]


def _nodes(tmp_path: Path, name: str) -> dict[int, LiveNode]:
    return live_fleet(tmp_path / name, LIVE)


def _job(tmp_path: Path, name: str, *extra: str) -> Any:
    base = ["experiment=smoke", *LIVE, f"output_dir={tmp_path / name}"]
    return compose_config([*base, "baselines=[]", *extra])


def _stage1_rows(results: dict[str, Any]) -> list[tuple[float, float]]:
    return [(h["loss"], h["val-score"]) for h in results["history"] if h["stage"] == "fe_ce"]


def test_a_run_killed_in_stage_1_resumes_with_its_momentum(tmp_path: Path) -> None:
    """Stage 1 with momentum, killed in round 3 (after round 2's checkpoint) and resumed, goes
    through exactly the rounds of an uninterrupted run; a plain run goes elsewhere."""
    momentum = "fe.server_momentum=0.9"
    whole = run_job(RelayGrid(_nodes(tmp_path, "whole")), _job(tmp_path, "whole", momentum))
    plain = run_job(RelayGrid(_nodes(tmp_path, "plain")), _job(tmp_path, "plain"))
    nodes = _nodes(tmp_path, "crash")
    with pytest.raises(ServerDied):
        run_job(RelayGrid(nodes, dies_in_stage1_round(3)), _job(tmp_path, "first", momentum))
    saved = checkpoint.load(tmp_path / "first")
    assert saved.in_progress["round"] == 2 and "fe_ce:momentum" in saved.arrays
    resumed = run_job(
        RelayGrid(nodes), _job(tmp_path, "second", momentum, f"resume={tmp_path / 'first'}")
    )
    assert len(_stage1_rows(whole)) == 4
    assert _stage1_rows(resumed) == _stage1_rows(whole)
    assert _stage1_rows(plain)[0] == _stage1_rows(whole)[0]  # both start from the same model
    assert _stage1_rows(plain)[2:] != _stage1_rows(whole)[2:]


def test_with_momentum_the_fedavg_baseline_is_exactly_plain_fedavg(tmp_path: Path) -> None:
    """The `fedavg` baseline of a run with stage-1 momentum is its own plain FedCE run: on the
    schedule of stage 1 it gives exactly what stage 1 of a plain run gives."""
    same_schedule = [
        "baselines=[fedavg]",
        "fe.patience=0",
        "baseline.fedavg_rounds=4",
        "baseline.fedavg_local_epochs=2",  # the smoke preset's fe.local_epochs
    ]
    runs = {}
    for name, extra in (("m", ["fe.server_momentum=0.9"]), ("p", [])):
        cfg = _job(tmp_path, name, *same_schedule, *extra)
        runs[name] = run_job(RelayGrid(_nodes(tmp_path, name)), cfg)
    stages = [h["stage"] for h in runs["m"]["history"]]
    assert stages.count("fe_ce") == 4 and stages.count("baseline_fedavg") == 4
    assert "baseline_fedavg" not in [h["stage"] for h in runs["p"]["history"]]
    for split in ("accuracy", "accuracy_global"):
        fedavg = [runs[n][split]["fedavg"]["per_client"] for n in ("m", "p")]
        assert fedavg[0] == fedavg[1]
