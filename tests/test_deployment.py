"""Real deployment on loopback: a SuperLink and SuperNodes as separate processes.

Each node is a `flower-supernode` with its own partition id and state dir; runs go
through `flwr run .` against the SuperLink. Covers an insecure run, TLS with node
authentication (an unregistered key is refused), a SuperNode restart followed by an
inference-only run on the saved state, and what the state files may hold.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from safetensors import SafetensorError, safe_open

from client_app.state import SEP, PersonalState
from scripts.local_deployment import COMPLETED_STATUS, Deployment

NUM_NODES = 3
STATE_KEY = "fleet-test"
RUN_TIMEOUT_S = 600
TINY = "experiment=smoke fe.rounds=1 gate.rounds=1 expert.epochs=3 partition=iid"
TINY_RANGATE = "experiment=smoke fe.rounds=1 gate=rangate expert.epochs=3 partition=iid"
INTRUDER_EXIT_TIMEOUT_S = 60
IMAGE_DIMS = [8, 8]  # digits images are 1x8x8; no state tensor may look like one
ACTIVATION_REFUSED = "Failed to activate SuperNode"
DEAD_NODE_TIMEOUT_S = 20  # how long the server waits for a node that is down


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def insecure(tmp_path_factory: pytest.TempPathFactory):
    deployment = Deployment(tmp_path_factory.mktemp("insecure"), NUM_NODES)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    deployment = Deployment(tmp_path_factory.mktemp("secure"), NUM_NODES, tls=True, auth=True)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def secure_run(secure: Deployment, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The TLS + node-auth run, submitted without waiting: (run id, output dir)."""
    out = tmp_path_factory.mktemp("secure_out")
    return secure.submit(f"{TINY_RANGATE} output_dir={out}"), out


@pytest.fixture(scope="module")
def trained(insecure: Deployment, secure_run: tuple[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """A full training run (stages 1-3) that saves state under STATE_KEY and records predictions.

    Requests `secure_run` so the TLS run is already going: the two runs overlap (each
    message is a fresh ClientApp process, so a run spends much of its time waiting).
    """
    out = tmp_path_factory.mktemp("train")
    status, _ = insecure.run(f"{TINY} state_key={STATE_KEY} record_predictions=true output_dir={out}", RUN_TIMEOUT_S)
    return status, results_of(out) if status == COMPLETED_STATUS else {}


def state_files(deployment: Deployment) -> list[Path]:
    return [deployment.workdir / f"node-{i}" / STATE_KEY / f"partition-{i}.safetensors" for i in range(NUM_NODES)]


def test_insecure_run_completes_and_saves_state(insecure: Deployment, trained: tuple[str, dict[str, Any]]) -> None:
    status, results = trained
    assert status == COMPLETED_STATUS
    nmoe = results["accuracy"]["nmoe"]
    assert len(nmoe["per_client"]) == NUM_NODES
    assert all(0.0 <= v <= 1.0 for v in nmoe["per_client"])
    assert results["nodes"] and len(results["nodes"]) == NUM_NODES
    for path in state_files(insecure):
        assert path.is_file(), f"missing {path}"


def test_state_files_hold_only_model_tensors(insecure: Deployment, trained: tuple[str, dict[str, Any]]) -> None:
    assert trained[0] == COMPLETED_STATUS
    for path in state_files(insecure):
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            assert keys
            groups = set()
            for key in keys:
                group, param = key.split(SEP, 1)
                assert group.startswith("model/") and param, f"{path.name}: unexpected key {key}"
                groups.add(group)
                shape = list(handle.get_slice(key).get_shape())
                assert shape[-2:] != IMAGE_DIMS, f"{path.name}: image-shaped tensor {key} {shape}"
        assert {"model/fe", "model/expert", "model/gate.fedgate"} <= groups


def test_loader_rejects_a_pickle_in_place_of_the_state_file(tmp_path: Path) -> None:
    """A pickle at the state path is refused as not-safetensors; its payload never runs."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "state" / STATE_KEY / "partition-0.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1,
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    with pytest.raises(SafetensorError):
        PersonalState(context, json.dumps({"state_key": STATE_KEY}))
    assert not marker.exists()
    assert not context.state.array_records


class _Payload:
    """Pickles to a call that would create `marker` if anything unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_inference_with_a_dead_expert_answers_every_live_query(
        insecure: Deployment, trained: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """SuperNode 2 is down: the others' queries are all answered, renormalised over the experts
    that answered; the degraded count is exactly the samples they had routed to expert 2."""
    status, train_results = trained
    assert status == COMPLETED_STATUS
    dead = NUM_NODES - 1
    insecure.stop_node(dead)
    insecure.wait_for_nodes(NUM_NODES - 1)
    status, _ = insecure.run(f"{TINY} mode=inference state_key={STATE_KEY} record_predictions=true "
                             f"min_nodes={NUM_NODES - 1} round_timeout_s={DEAD_NODE_TIMEOUT_S} "
                             f"output_dir={tmp_path}", RUN_TIMEOUT_S)
    insecure.start_node(dead)
    insecure.wait_for_nodes(NUM_NODES)
    assert status == COMPLETED_STATUS
    results = results_of(tmp_path)
    gate = train_results["config"]["gate"]["method"]
    live = [str(i) for i in range(NUM_NODES) if i != dead]
    for split in ("test", "global"):
        answered = results["predictions"][gate][split]
        assert sorted(answered) == live
        for client in live:  # every query of a live client got an answer
            assert len(answered[client]) == len(train_results["predictions"][gate][split][client])
    expected = sum(train_results["routing_counts"][gate][client][dead] for client in live)
    assert results["extra"]["degraded_queries"][gate]["test"] == expected
    assert any(dead in f["failed_experts"] for f in results["extra"]["inference_failures"])
    assert results["accuracy"]["nmoe"]["clients"] == [int(c) for c in live]


def test_restarted_node_serves_the_same_predictions(insecure: Deployment, trained: tuple[str, dict[str, Any]],
                                                    tmp_path: Path) -> None:
    """Stop SuperNode 1, start it again on the same state dir; an inference-only run reloads
    every client's saved state and reproduces the training run's final predictions exactly."""
    status, train_results = trained
    assert status == COMPLETED_STATUS
    old = insecure.stop_node(1)
    assert old.process is not None and old.process.poll() is not None
    insecure.wait_for_nodes(NUM_NODES - 1)
    restarted = insecure.start_node(1)
    assert restarted.state_dir == old.state_dir and restarted.process.pid != old.process.pid
    insecure.wait_for_nodes(NUM_NODES)

    status, _ = insecure.run(f"{TINY} mode=inference state_key={STATE_KEY} record_predictions=true "
                             f"output_dir={tmp_path}", RUN_TIMEOUT_S)
    assert status == COMPLETED_STATUS
    results = results_of(tmp_path)
    gate = train_results["config"]["gate"]["method"]
    for split in ("test", "global"):
        before = train_results["predictions"][gate][split]
        after = results["predictions"][gate][split]
        assert sorted(after) == [str(i) for i in range(NUM_NODES)]
        assert after == before, f"{gate}/{split} predictions changed after the restart"
    assert results["accuracy"]["nmoe"] == train_results["accuracy"]["nmoe"]
    assert "fe_ce" not in results["wall_time_s"]  # nothing was trained


def test_tls_and_node_auth_run_completes(secure: Deployment, secure_run: tuple[str, Path]) -> None:
    run_id, out = secure_run
    status = secure.wait(run_id, RUN_TIMEOUT_S)
    assert status == COMPLETED_STATUS, secure.logs(run_id)[-3000:]
    assert len(results_of(out)["accuracy"]["nmoe"]["per_client"]) == NUM_NODES


def test_unregistered_node_is_refused(secure: Deployment) -> None:
    """A SuperNode whose key was never registered exits non-zero and never shows up online."""
    before = {n["node-id"] for n in secure.online_nodes()}
    intruder = secure.start_extra_node("intruder", NUM_NODES, secure.make_key("intruder"))
    assert intruder.process is not None
    code = intruder.process.wait(timeout=INTRUDER_EXIT_TIMEOUT_S)
    assert code != 0
    assert ACTIVATION_REFUSED in intruder.log.read_text()
    assert {n["node-id"] for n in secure.online_nodes()} == before
    assert len(before) == NUM_NODES
