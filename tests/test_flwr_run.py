"""A real `flwr run` of all three stages against a SuperLink started by the test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from nmoe.config import compose_config
from nmoe.models import build_bundle, build_expert, stage1_keys, state_numpy
from scripts.local_deployment import SimulationFederation
from server_app.checkpoint import CheckpointError
from server_app.checkpoint import load as load_checkpoint

NUM_CLIENTS = 6
RUN_TIMEOUT_S = 400
CHANCE = 0.1
WIDE_MARGIN_ACC = 0.5  # five times chance on 10 classes
CHECKPOINT_SETTLE_S = 3
OVERRIDES = (
    "partition=dirichlet partition.alpha=0.3 gate=fedgate gate.sync_trunk_every=1 "
    "gate.sync_head_every=0 "
    "audit_messages=true "
    "baselines=[fedavg,shared_fe_own_head] fe.rounds=8"
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    fed = SimulationFederation(tmp_path_factory.mktemp("federation"), NUM_CLIENTS).start()
    yield fed
    fed.stop()


@pytest.fixture(scope="module")
def finished_run(federation: SimulationFederation, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run")
    run_id = federation.submit(f"{OVERRIDES} output_dir={out}")
    status = federation.wait(run_id, RUN_TIMEOUT_S)
    return status, out, run_id


def test_run_completes_with_results_contract(finished_run) -> None:
    status, out, _ = finished_run
    assert status == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["partition"]["alpha"] == 0.3
    for table in ("accuracy", "accuracy_global"):
        for method in ("local_expert", "nmoe", "fedgate", "fedavg", "shared_fe_own_head"):
            entry = results[table][method]
            assert len(entry["per_client"]) == NUM_CLIENTS
            assert all(0.0 <= v <= 1.0 for v in entry["per_client"])
            assert entry["mean"] == pytest.approx(np.mean(entry["per_client"]))
    for stage in ("fe_ce", "expert", "gate_cache", "fedgate", "inference"):
        assert results["comm_bytes"][stage]["up"] > 0 and results["comm_bytes"][stage]["down"] > 0
        assert results["wall_time_s"][stage] > 0
    fe_rounds = [h for h in results["history"] if h["stage"] == "fe_ce"]
    assert [h["round"] for h in fe_rounds] == list(range(1, 9))
    assert all(h["replies"] == NUM_CLIENTS for h in fe_rounds)


def test_nmoe_and_local_expert_beat_chance_widely(finished_run) -> None:
    _, out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    for method in ("nmoe", "local_expert"):
        assert results["accuracy"][method]["mean"] >= WIDE_MARGIN_ACC > CHANCE


def test_strategy_byte_record_matches_model_size(finished_run) -> None:
    """FedCE sends F + head (not the SSL projector it never trains) to every client every round,
    and gets them back."""
    _, out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    cfg = compose_config(["partition=dirichlet"])
    bundle = build_bundle(cfg.model, (1, 8, 8), 10, 0)
    trained = stage1_keys(bundle, "fedce")
    assert trained and not any(k.startswith("projector.") for k in trained)
    model_bytes = sum(v.nbytes for k, v in state_numpy(bundle).items() if k in trained)
    payload = NUM_CLIENTS * 8 * model_bytes
    fe = results["comm_bytes"]["fe_ce"]
    assert payload <= fe["down"] < 1.1 * payload
    assert payload <= fe["up"] < 1.1 * payload


def test_no_expert_or_raw_input_crosses_the_grid(finished_run) -> None:
    _, out, _ = finished_run
    cfg = compose_config([])
    feature_dim, num_classes = cfg.model.feature_dim, 10
    expert_keys = set(state_numpy(build_expert(cfg.model, num_classes, 0)))
    rows = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    assert {r["type"] for r in rows} >= {
        "query.setup",
        "train.extractor",
        "train.install",
        "train.expert",
        "train.gate",
        "evaluate",
        "query.route",
        "query.expert",
        "query.combine",
    }
    for row in rows:
        for key, meta in row["arrays"].items():
            record, name = key.split("/", 1)
            shape = meta["shape"]
            assert shape[-2:] != [8, 8], f"image-shaped array {key} in {row['type']}"
            if row["direction"] == "up" and row["type"] != "train.shared_expert":
                assert name not in expert_keys, f"expert key {key} sent up in {row['type']}"
            if row["type"] in ("query.route", "query.expert", "query.combine"):
                # peer payloads are sealed end to end: the relay sees byte blobs, no feature or
                # logit array in the clear (a sealed (n, d) float32 array is 4 n d + 84 bytes)
                assert meta["dtype"] == "uint8" and len(shape) == 1, f"plaintext {key} in {row}"
                if row["type"] == "query.route":
                    assert record == "features" and (shape[0] - 84) % (4 * feature_dim) == 0
                if row["type"] == "query.expert" and row["direction"] == "up":
                    assert record == "logits" and (shape[0] - 84) % (4 * num_classes) == 0
            if row["type"] == "train.gate" and row["direction"] == "up":
                assert name.startswith("trunk."), f"personal gate key {key} sent to the server"
    ups = [r for r in rows if r["direction"] == "up"]
    assert not any(r["error"] for r in ups)


def test_invalid_override_fails_before_training(
    federation: SimulationFederation, tmp_path: Path
) -> None:
    run_id = federation.submit(f"gate.k=0 output_dir={tmp_path}")
    status = federation.wait(run_id, RUN_TIMEOUT_S)
    assert status == "finished:failed"
    assert "config key 'gate.k'" in federation.logs(run_id)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.deployment
def test_stopped_run_resumes_after_its_last_checkpointed_round(
    federation: SimulationFederation, tmp_path: Path
) -> None:
    """Stop the ServerApp's run in the middle of stage 1, start it again with resume=: it
    continues."""
    import shutil

    rounds, stop_after = 120, 2  # ~0.1-0.2 s per round: `flwr stop` must land well before the end
    first, snapshot, second = tmp_path / "first", tmp_path / "snapshot", tmp_path / "second"
    overrides = f"experiment=smoke fe.rounds={rounds} fe.local_epochs=1 baselines=[]"
    run_id = federation.submit(f"{overrides} output_dir={first}")
    state = first / "checkpoint" / "checkpoint.npz"

    def round_done(folder: Path) -> int:
        try:
            return load_checkpoint(folder).round_done("fe_ce")
        except (FileNotFoundError, CheckpointError):
            return 0

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and round_done(first) < stop_after:
        time.sleep(0.1)
    federation.flwr("stop", run_id, federation.connection)
    assert federation.wait(run_id, RUN_TIMEOUT_S) != "finished:completed"
    # The run is marked stopped before its process is gone: wait until the checkpoint settles.
    settled = None
    while time.monotonic() < deadline and settled != state.stat().st_mtime_ns:
        settled = state.stat().st_mtime_ns
        time.sleep(CHECKPOINT_SETTLE_S)
    shutil.copytree(first, snapshot)
    progress = {"in_progress": load_checkpoint(snapshot).in_progress}
    assert progress["in_progress"].get("stage") == "fe_ce", (
        f"stage 1 ended before the stop: {progress}"
    )
    done = progress["in_progress"]["round"]
    assert stop_after <= done < rounds
    resumed = federation.submit(f"{overrides} resume={snapshot} output_dir={second}")
    assert federation.wait(resumed, RUN_TIMEOUT_S) == "finished:completed"
    assert f"resuming after round {done}" in federation.logs(resumed)
    results = json.loads((second / "results.json").read_text())
    assert [h["round"] for h in results["history"] if h["stage"] == "fe_ce"] == list(
        range(1, rounds + 1)
    )
    assert (
        results["status"] == "completed"
        and len(results["accuracy"]["nmoe"]["per_client"]) == NUM_CLIENTS
    )


def test_flwr_run_and_hydra_cli_resolve_the_same_config(finished_run) -> None:
    """The run-config `overrides` of `flwr run` and the same overrides on `nmoe` compose alike."""
    import subprocess
    import sys

    import yaml
    from omegaconf import OmegaConf

    from nmoe.config import to_dict, to_structured

    _, out, _ = finished_run
    from_flwr = json.loads((out / "results.json").read_text())["config"]
    cli = Path(sys.executable).parent / "nmoe"
    printed = subprocess.run(
        [str(cli), *OVERRIDES.split(), f"output_dir={out}", "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    from_cli = to_dict(to_structured(OmegaConf.create(yaml.safe_load(printed))))
    assert from_cli == from_flwr
