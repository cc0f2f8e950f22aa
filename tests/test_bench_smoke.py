"""Smoke test of the benchmarks (bench/): every script runs at its --tiny size into a temp dir
and writes a well-formed result, so the scripts do not rot. The numbers are meaningless here;
the real measurements are run by hand (see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPT_TIMEOUT_S = 600
MACHINE_KEYS = {"cpu_count", "mem_total_bytes", "python", "torch", "flwr", "date_utc"}
PNG_MAGIC = b"\x89PNG"

sys.path.insert(0, str(BENCH))
from accuracy import pareto_front  # noqa: E402
from benchlib import linear_fit  # noqa: E402


def run_bench(script: str, out_dir: Path, *args: str) -> dict[str, Any]:
    """Run `bench/<script>.py --tiny --out-dir out_dir ...` and return its JSON result."""
    command = [
        sys.executable,
        str(BENCH / f"{script}.py"),
        "--tiny",
        "--out-dir",
        str(out_dir),
        *args,
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads((out_dir / f"{script}.json").read_text())
    assert MACHINE_KEYS <= set(result["machine"]), result["machine"]
    assert f"{script}.py" in result["command"] and "--tiny" in result["command"]
    return result


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def test_pareto_front_and_fit() -> None:
    points = {"a": (0.9, 0.5), "b": (0.8, 0.8), "c": (0.7, 0.7), "d": (0.8, 0.8), "e": (0.5, 0.9)}
    assert pareto_front(points) == ["a", "b", "d", "e"]  # c is dominated; equal points both stay
    fit = linear_fit([10.0, 20.0, 40.0], [1.0, 2.0, 4.0])
    assert (
        fit["slope"] == pytest.approx(0.1)
        and fit["intercept"] == pytest.approx(0.0)
        and fit["r2"] == pytest.approx(1.0)
    )


def test_accuracy_and_comm(out_dir: Path) -> None:
    acc = run_bench("accuracy", out_dir)
    assert acc["jobs"] == 2  # fe=fedce,fedsc x one alpha x one seed
    assert (out_dir / "accuracy.png").read_bytes()[:4] == PNG_MAGIC
    report = acc["nmoe"]["0.3"]
    assert {
        "on_pareto_front",
        "local_gap_to_best_personal",
        "global_greater_than_fedavg",
        "global_greater_than_shared_fe_own_head",
        "local_gap_to_centralized",
        "global_gap_to_centralized",
    } <= set(report)
    assert "centralized" not in acc["pareto_front"]["0.3"]
    assert "fedsc" in acc["fe_comparison"]
    assert acc["config"]["nmoe_config"] in acc["config"]["sweep_command"]

    comm = run_bench("comm", out_dir, "--sweep-dir", str(out_dir / "sweeps" / "accuracy"))
    assert comm["summary"]["jobs"] == 2 and comm["summary"]["fedgate_bar_jobs"] == 2
    job = comm["jobs"][0]
    assert job["fedgate_bar"]["fedgate_upload_per_round"] > 0
    assert {"fedavg", "nmoe", "local_only", "centralized"} <= set(job["methods"])
    assert job["methods"]["centralized"]["raw_training_data_upload_bytes"] > 0


def test_overhead(out_dir: Path) -> None:
    result = run_bench("overhead", out_dir)
    (flower,) = result["flower"]
    assert flower["comparison"]["final_params_max_abs_diff"] == 0.0  # the same work, bit for bit
    assert flower["breakdown"]["time_to_first_round_end_s"] > 0
    assert result["plain"]["wall_s"] > 0 and flower["tree_cpu_s"] > 0
    assert "bar_met" in result["bar"]


def test_inference(out_dir: Path) -> None:
    result = run_bench("inference", out_dir)
    loads = result["per_load"]
    assert list(loads) == ["test", "test+global", "global x2"]
    for entry in loads.values():
        assert (
            entry["prediction_agreement"] == 1.0
        )  # the local reference computes what the waves computed
        assert entry["routed_samples_per_s"] > 0 and entry["local_samples_per_s"] > 0
    # coalescing: one query over test+global answers as many samples as the two splits; two copies of global twice one
    assert loads["test+global"]["samples"] > loads["test"]["samples"]
    assert loads["global x2"]["samples"] == 2 * (
        loads["test+global"]["samples"] - loads["test"]["samples"]
    )
    assert result["bytes"]["raw_input_bytes_per_sample"] == 8 * 8 * 4
    assert set(result["waves"]["test"]) >= {"query.route", "query.expert", "query.combine"}


def test_scale(out_dir: Path) -> None:
    result = run_bench("scale", out_dir)
    assert [s["clients"] for s in result["sizes"]] == [2, 3]
    assert all(
        s["run"]["peak_pss_sum_bytes"] > 0 and s["run"]["peak_processes"] > 1
        for s in result["sizes"]
    )
    assert result["fits_seconds_vs_clients"]["fe_ce"]["points"] == 2
