"""A SuperNode crashes in the middle of stage 1 (real deployment on loopback, SIGKILL by PID).

Two runs share one four-node federation and the same crash: one accepts half of the replies
(`min_reply_fraction=0.5`) and must finish without the dead node, saying in results.json which
node dropped and when; the other demands 80% of the replies and must stop cleanly after its
retry, with status "failed", the reason, and the rounds it completed before the crash.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scripts.local_deployment import COMPLETED_STATUS, Deployment

NUM_NODES = 4
VICTIM = 3
FE_ROUNDS = 4
KILL_AFTER_ROUND = 1
ROUND_TIMEOUT_S = 120  # a live node answers well within it; the dead one is waited for at most this long
RUN_TIMEOUT_S = 900
RUN = (f"experiment=smoke partition=iid gate=rangate fe.rounds={FE_ROUNDS} fe.local_epochs=1 expert.epochs=3 "
       f"baselines=[] round_timeout_s={ROUND_TIMEOUT_S} round_retries=1")
TOLERANT = 0.5  # 3 of 4 replies are enough
STRICT = 0.8  # 3 of 4 are not


def checkpointed_round(out: Path) -> int:
    """The last stage-1 round the run's checkpoint records (0 before the first)."""
    state = out / "checkpoint" / "state.json"
    try:
        progress = json.loads(state.read_text())
    except (OSError, ValueError):
        return 0
    if "fe_ce" in progress["completed"]:
        return FE_ROUNDS
    return int(progress["in_progress"].get("round", 0)) if progress["in_progress"].get("stage") == "fe_ce" else 0


def kill_victim_after_round(deployment: Deployment, outs: list[Path], killed: dict[str, Any]) -> None:
    """Crash SuperNode VICTIM once every run has checkpointed KILL_AFTER_ROUND stage-1 rounds."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        rounds = [checkpointed_round(out) for out in outs]
        if min(rounds) >= KILL_AFTER_ROUND:
            deployment.kill_node(VICTIM)
            killed["rounds_done"] = rounds
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both runs, the crash in between, and their final statuses and results."""
    deployment = Deployment(tmp_path_factory.mktemp("dropout"), NUM_NODES)
    out = {"tolerant": tmp_path_factory.mktemp("tolerant"), "strict": tmp_path_factory.mktemp("strict")}
    try:
        deployment.start()
        runs = {name: deployment.submit(f"{RUN} min_reply_fraction={fraction} output_dir={out[name]}")
                for name, fraction in (("tolerant", TOLERANT), ("strict", STRICT))}
        killed: dict[str, Any] = {}
        kill_victim_after_round(deployment, list(out.values()), killed)
        statuses = {name: deployment.wait(run_id, RUN_TIMEOUT_S) for name, run_id in runs.items()}
        logs = {name: deployment.logs(run_id) for name, run_id in runs.items()}
    finally:
        deployment.stop()
    results = {name: json.loads((path / "results.json").read_text()) if (path / "results.json").is_file() else {}
               for name, path in out.items()}
    return {"killed": killed, "status": statuses, "results": results, "logs": logs}


def test_victim_was_killed_in_the_middle_of_stage_1(crashed_runs: dict[str, Any]) -> None:
    rounds = crashed_runs["killed"].get("rounds_done")
    assert rounds is not None, "the runs never checkpointed a stage-1 round"
    assert all(KILL_AFTER_ROUND <= r < FE_ROUNDS for r in rounds), rounds


def test_run_finishes_without_the_dropped_node_and_names_it(crashed_runs: dict[str, Any]) -> None:
    status, results = crashed_runs["status"]["tolerant"], crashed_runs["results"]["tolerant"]
    assert status == COMPLETED_STATUS, crashed_runs["logs"]["tolerant"][-3000:]
    assert results["status"] == "completed"
    dropped = results["extra"]["dropped"]
    assert dropped and all(entry["clients"] == [VICTIM] for entry in dropped), dropped
    stage1 = [entry["round"] for entry in dropped if entry["stage"] == "fe_ce"]
    assert stage1 and min(stage1) > KILL_AFTER_ROUND
    history = {h["round"]: h["replies"] for h in results["history"] if h["stage"] == "fe_ce"}
    assert sorted(history) == list(range(1, FE_ROUNDS + 1))
    assert history[1] == NUM_NODES
    assert all(history[r] == NUM_NODES - 1 for r in stage1)
    survivors = [i for i in range(NUM_NODES) if i != VICTIM]
    assert results["accuracy"]["nmoe"]["clients"] == survivors
    assert len(results["accuracy"]["nmoe"]["per_client"]) == len(survivors)


def test_strict_run_stops_cleanly_with_what_it_measured(crashed_runs: dict[str, Any]) -> None:
    status, results = crashed_runs["status"]["strict"], crashed_runs["results"]["strict"]
    assert status != COMPLETED_STATUS
    assert results["status"] == "failed"
    assert "too few replies after 1 retries" in results["error"]
    assert "stage 'fe_ce'" in results["error"]
    history = [h for h in results["history"] if h["stage"] == "fe_ce"]
    assert history and history[0]["round"] == 1 and history[0]["replies"] == NUM_NODES
    failed_round = int(results["error"].split("round ")[1].split(":")[0])
    attempts = [entry for entry in results["extra"]["dropped"] if entry["round"] == failed_round]
    assert len(attempts) == 2 and all(entry["clients"] == [VICTIM] for entry in attempts)  # first try + 1 retry
