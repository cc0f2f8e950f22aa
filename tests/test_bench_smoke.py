"""Smoke test of the benchmarks (bench/): every script runs at its --tiny size into a temp dir
and writes a well-formed result, so the scripts do not rot. The numbers are meaningless here;
the real measurements are run by hand (see bench/README.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCRIPT_TIMEOUT_S = 600
MACHINE_KEYS = {"cpu_count", "mem_total_bytes", "python", "torch", "flwr", "date_utc"}
PNG_MAGIC = b"\x89PNG"

sys.path.insert(0, str(BENCH))
from benchlib import (  # noqa: E402
    BYTES_PER_FLOAT32,
    kill_tree,
    linear_fit,
    pareto_front,
    run_resumable,
)

from nmoe import gates  # noqa: E402
from nmoe.datasets import DATASETS  # noqa: E402


def run_bench(script: str, out_dir: Path, *args: str, name: str = "") -> dict[str, Any]:
    """Run `bench/<script>.py --tiny --out-dir out_dir ...` and return its JSON result
    (`<name>.json`, by default `<script>.json`)."""
    command = [
        sys.executable,
        str(BENCH / f"{script}.py"),
        "--tiny",
        "--out-dir",
        str(out_dir),
        *args,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # stop the script and what it started (nmoe jobs, Ray)
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{script} timed out after {SCRIPT_TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    assert process.returncode == 0, f"{script} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    result = json.loads((out_dir / f"{name or script}.json").read_text())
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


def test_the_routing_lab_ranks_each_rule_and_grid_point_once_against_the_panels_bars() -> None:
    import routing_lab

    def federation(own: float, knowgate: tuple[float, float]) -> dict[str, Any]:
        """Scores of one federation: the personal bar `own`, fedavg 0.8 global, every named rule
        at the bars but `knowgate`, and one grid row with the default options, scored apart."""
        at_bars = {"test": own - 0.01, "global": 0.79}
        scores: dict[str, Any] = {name: dict(at_bars) for name in routing_lab.RULES}
        scores["knowgate"] = {"test": knowgate[0], "global": knowgate[1]}
        scores["run"] = {
            "local_expert": {"test": own, "global": 0.3},
            "local_only": {"test": own - 0.05, "global": 0.2},
            "fedavg": {"test": 0.7, "global": 0.8},
        }
        default = {"local_head": True, **routing_lab.KNOWGATE_DEFAULTS}
        scores["grid"] = [
            {"options": default, "test": own - 0.03, "global": 0.79},
            {"options": {**default, "local_head": False}, "test": own, "global": 0.7},
        ]
        return scores

    table = {"a/x": {"1": federation(0.9, (0.87, 0.78))}, "b/y": {"1": federation(0.95, (1, 1))}}
    ranked = routing_lab.ranking(table)
    rows = {row["rule"]: row for row in ranked}
    # 0.9 - 0.01 - 0.87 = 2 points local, 0.79 - 0.78 = 1 point global; nothing on b/y
    assert rows["knowgate"]["shortfall"] == pytest.approx(3.0)
    assert rows["knowgate"]["met"] == 2  # b/y, both bars
    # the grid row with knowgate's options is a row of its own, not summed into `knowgate`
    assert rows["grid: as knowgate"]["shortfall"] == pytest.approx(2.0 + 2.0)
    assert rows["grid: local_head=False"]["shortfall"] == pytest.approx(9.0 + 9.0)
    assert rows["fedavg"]["shortfall"] == pytest.approx(0.0) and rows["fedavg"]["met"] == 4
    totals = [row["shortfall"] for row in ranked]
    assert totals == sorted(totals) and len(totals) == len(routing_lab.RULES) + 2


# a stand-in job: the first attempt leaves a checkpoint and fails, one that resumes completes
FLAKY_JOB = """
import json, sys
from pathlib import Path
out = Path.cwd()
if not any(a.startswith("resume=") for a in sys.argv[1:]):
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "checkpoint.npz").write_bytes(b"")
    sys.exit(3)
(out / "results.json").write_text(json.dumps({"status": "completed", "argv": sys.argv[1:]}))
"""


def test_a_bench_job_is_retried_from_its_checkpoint_and_kept_once_completed(tmp_path) -> None:
    out = tmp_path / "job"
    command = [sys.executable, "-c", FLAKY_JOB, "seed=0"]
    once = run_resumable(command, out, 60, "test", attempts=1)
    assert once["exit"] == 3 and len(once["attempts"]) == 1  # no retry asked for
    run = run_resumable(command, tmp_path / "job2", 60, "test", attempts=3)
    assert [a["exit"] for a in run["attempts"]] == [3, 0]
    assert run["attempts"][1]["command"][-1] == f"resume={tmp_path / 'job2'}"
    results = json.loads((tmp_path / "job2" / "results.json").read_text())
    assert results["argv"] == ["seed=0", f"resume={tmp_path / 'job2'}"]
    again = run_resumable(command, tmp_path / "job2", 60, "test", attempts=3)
    assert again == {"seconds": 0.0, "exit": 0, "kept": True}  # completed: not run again


def test_panel_and_comm(out_dir: Path) -> None:
    panel = run_bench("panel", out_dir)
    (job,) = panel["jobs"]  # one dataset, one setting, one seed
    assert (job["dataset"], job["setting"], job["seed"], job["exit"]) == ("digits", "dir0.3", 0, 0)
    assert (out_dir / "panel_digits.png").read_bytes()[:4] == PNG_MAGIC
    assert "digits" in (out_dir / "panel.md").read_text()
    cell = panel["analysis"]["digits"]["dir0.3"]
    methods = set(cell["methods"])
    assert {"nmoe", "local_expert", "fedavg", "centralized", "oracle_router"} <= methods
    assert set(gates.names()) <= methods  # the panel preset runs every gate of the registry
    assert {"global_vs_fedavg", "local_vs_best_personal", "headroom_share"} <= set(cell["bars"])
    assert {"on_pareto_front", "gap_to_centralized", "gap_to_fedavg_task_prior"} <= set(
        cell["bars"]
    )
    assert cell["pareto_front"] and not {"centralized", "oracle_router"} & set(cell["pareto_front"])
    assert panel["cells"][0]["config"]["simulation"]["num_clients"] == 3
    (bar_note,) = [n for n in panel["notes"] if n.startswith("Bars")]  # names what bars() reads
    assert all(m in bar_note for m in ("local_expert", "local_head", "shared_fe_own_head"))

    comm = run_bench("comm", out_dir)  # reads the panel's runs in the same out dir
    assert comm["summary"]["jobs"] == 1 and comm["summary"]["fedgate_bar_jobs"] == 1
    (job,) = comm["jobs"]
    assert job["fedgate_bar"]["fedgate_upload_per_round"] > 0
    assert job["fedgate_bar"]["rounds"] == 2
    assert {"fedavg", "nmoe", "local_only", "centralized", *gates.names()} <= set(job["methods"])
    assert job["methods"]["centralized"]["raw_training_data_upload_bytes"] > 0
    assert job["methods"]["fedgate"]["rounds"] == 2 + 1 + 2  # stage 1, H_0, FedGate
    assert 0 < comm["cifar10_resnet_reference"]["fraction"] < 1


@pytest.mark.bench
def test_ssl(tmp_path: Path) -> None:
    # two nmoe jobs: digits, label fraction 0.5
    result = run_bench("ssl_bench", tmp_path / "jobs", name="ssl")
    assert [(j["method"], j["exit"]) for j in result["jobs"]] == [("fedce", 0), ("hybrid", 0)]
    cell = result["table"]["digits:0.5"]
    assert 0 < cell["random_init"]["probe"][0] <= 1
    for method in ("fedce", "hybrid"):
        assert 0 < cell[method]["probe"][0] <= 1 and 0 <= cell[method]["nmoe_global"][0] <= 1
    row = result["rows"][0]
    assert row["config"]["dataset"]["label_fraction"] == 0.5 and len(row["probe_per_round"]) == 2
    assert "hybrid_vs_fedce" not in result["bars"]["digits:0.5"]  # a fraction-1.0 bar only
    assert "| digits | 0.5 | random init |" in (tmp_path / "jobs" / "ssl.md").read_text()
    # in-process stage 1, 3 methods
    probe = run_bench("ssl_bench", tmp_path / "probe", "--probe-only", name="ssl")
    rows = probe["rows"]
    assert [r["method"] for r in rows] == ["fedce", "fedsc", "hybrid"]
    assert all(r["probe_only"] and r["nmoe_global"] is None for r in rows)
    assert all(len(r["probe_per_round"]) == 2 and 0 < r["probe"] <= 1 for r in rows)


@pytest.mark.bench
def test_overhead(out_dir: Path) -> None:
    result = run_bench("overhead", out_dir)
    (flower,) = result["flower"]
    assert flower["comparison"]["final_params_max_abs_diff"] == 0.0  # the same work, bit for bit
    assert flower["breakdown"]["time_to_first_round_end_s"] > 0
    assert result["plain"]["wall_s"] > 0 and flower["tree_cpu_s"] > 0
    assert "bar_met" in result["bar"]


@pytest.mark.bench
def test_inference(out_dir: Path) -> None:
    result = run_bench("inference", out_dir)
    loads = result["per_load"]
    assert list(loads) == ["test", "test+global", "global x2"]
    for entry in loads.values():
        assert (
            entry["prediction_agreement"] == 1.0
        )  # the local reference computes what the waves computed
        assert entry["routed_samples_per_s"] > 0 and entry["local_samples_per_s"] > 0
    # coalescing: one query over test+global answers as many samples as the two splits; two
    # copies of global twice one
    assert loads["test+global"]["samples"] > loads["test"]["samples"]
    assert loads["global x2"]["samples"] == 2 * (
        loads["test+global"]["samples"] - loads["test"]["samples"]
    )
    digits = math.prod(DATASETS["digits"].image_shape) * BYTES_PER_FLOAT32
    assert result["bytes"]["raw_input_bytes_per_sample"] == digits
    assert set(result["waves"]["test"]) >= {"query.route", "query.expert", "query.combine"}


@pytest.mark.bench
def test_scale(out_dir: Path) -> None:
    result = run_bench("scale", out_dir)
    assert [s["clients"] for s in result["sizes"]] == [2, 3]
    assert all(
        s["run"]["peak_pss_sum_bytes"] > 0 and s["run"]["peak_processes"] > 1
        for s in result["sizes"]
    )
    assert result["fits_seconds_vs_clients"]["fe_ce"]["points"] == 2


class _KnowsClasses(torch.nn.Module):
    """An expert on 2-D features that knows `classes` (nearest centre among them) and gives every
    other class a logit of -50: confidently wrong on the classes it never saw."""

    def __init__(self, centres: torch.Tensor, classes: list[int]) -> None:
        super().__init__()
        self.centres, self.known = centres, torch.zeros(len(centres), dtype=torch.bool)
        self.known[classes] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -(torch.cdist(x, self.centres) ** 2)
        return logits.masked_fill(~self.known, -50.0)


def test_the_pooled_label_gate_learns_who_knows_what_and_its_headroom_share_is_read_right():
    """The routing lab's pooled-label ceilings on a constructed federation: two experts that each
    know two of four classes and a shared slot that knows none; fitted on both clients' labelled
    rows pooled, the gate routes the balanced test almost perfectly, where either expert alone
    gets half of it."""
    import routing_lab

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 6,000 small steps: 4 s on one thread, minutes on two under load
    try:
        _pooled_gate_case(routing_lab)
    finally:
        torch.set_num_threads(threads)


def _pooled_gate_case(routing_lab: Any) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 4.0]])

    def rows(classes: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
        return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y

    experts = [_KnowsClasses(centres, [0, 1]), _KnowsClasses(centres, [2, 3])]
    blind = torch.nn.Linear(2, 4)  # stage 1's model in the shared slot: uniform
    torch.nn.init.zeros_(blind.weight), torch.nn.init.zeros_(blind.bias)
    gx, gy = rows([0, 1, 2, 3], 200)
    data = []
    for known in ([0, 1], [2, 3]):
        (ex, ey), (tx, ty) = rows(known, 100), rows(known, 40)
        data.append(
            {
                "expert_feats": ex,
                "expert_y": ey,
                "gate_feats": tx,
                "gate_y": ty,
                "global": {"feats": gx, "y": gy},
                "reachable": torch.tensor([True, True, True]),
            }
        )
    fed = SimpleNamespace(n=2, shared=2, num_experts=3, experts=[*experts, blind], head=blind)
    fed.data, fed.ratio_cache = data, {}
    for i in range(2):
        right = routing_lab.RULES["pooled_label_gate"](fed, i, "global").argmax(dim=1) == gy
        assert float(right.float().mean()) >= 0.95
        assert float((experts[i](gx).argmax(dim=1) == gy).float().mean()) <= 0.6

    scores = {rule: {"test": 0.5, "global": 0.7} for rule in routing_lab.RULES}
    scores["run"] = {"fedavg": {"global": 0.6}, "oracle_router": {"global": 1.0}}
    shares = routing_lab.headroom_shares({"a/x": {"1": scores}, "b/y": {"1": {**scores, "run": {
        "fedavg": {"global": 0.6}, "oracle_router": {"global": 0.61}}}}})  # fmt: skip
    assert list(shares) == ["a/x/seed1"]  # b/y's headroom is under 2 points
    assert shares["a/x/seed1"]["pooled_label_gate"] == pytest.approx(0.25)
