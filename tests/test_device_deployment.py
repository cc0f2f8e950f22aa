"""Devices that hold their own data, and a server that holds none: three real SuperNodes, each
reading only its own exported `data-dir` (Fashion-MNIST), and a run whose `dataset.path` names a
folder that does not exist, so that any attempt by the ServerApp to read the dataset fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.local_deployment import COMPLETED_STATUS, REPO, Deployment

pytestmark = pytest.mark.deployment  # real processes: python -m pytest -m deployment

NODES = 3
RUN_TIMEOUT_S = 900
RUN = (
    "experiment=smoke dataset=fashion_mnist partition=iid fe.rounds=5 fe.local_epochs=2 "
    "expert.epochs=10 gate=rangate baselines=[fedavg]"
)


def test_devices_train_on_their_own_folders_with_no_dataset_on_the_server(tmp_path: Path) -> None:
    data = tmp_path / "devices"
    export = [
        sys.executable,
        str(REPO / "scripts" / "export_device_data.py"),
        "--dataset=fashion_mnist",
        "--partition=iid",
        f"--nodes={NODES}",
        "--subsample=1500",
        "--with-global-test",
        f"--out={data}",
    ]
    subprocess.run(export, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    nowhere = tmp_path / "no-dataset-here"
    with Deployment(tmp_path / "fleet", NODES, data_dirs=data) as deployment:
        status, run_id = deployment.run(
            f"{RUN} dataset.path={nowhere} output_dir={out}", RUN_TIMEOUT_S
        )
        logs = deployment.logs(run_id)
    assert status == COMPLETED_STATUS, logs[-3000:]
    results = json.loads((out / "results.json").read_text())
    sources = {str(n["data_source"]) for n in results["nodes"]["info"].values()}
    assert sources == {"data-dir"}, results["nodes"]
    assert not nowhere.exists()
    for method in ("local_expert", "nmoe", "fedavg"):
        assert len(results["accuracy"][method]["per_client"]) == NODES
        assert len(results["accuracy_global"][method]["per_client"]) == NODES
    assert results["accuracy_global"]["fedavg"]["mean"] > 0.4  # 10 classes: it learned
