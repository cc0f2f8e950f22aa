"""The user-facing workflow: presets and README overrides compose, the Hydra CLI runs a
real multirun sweep, and the report writes plots and a sweep summary."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nmoe import gates
from nmoe.config import BASELINES, CONF_DIR, ConfigError, compose_config
from nmoe.results import load_results
from server_app import report

NMOE_CLI = Path(sys.executable).parent / "nmoe"
SWEEP_TIMEOUT_S = 600
SEEDS = (0, 1)
NUM_CLIENTS = 3
FAST_OVERRIDES = (
    "experiment=smoke",
    "fe.rounds=2",
    "gate.rounds=1",
    "expert.epochs=2",
    f"simulation.num_clients={NUM_CLIENTS}",
    "partition=iid",
)
MIN_PNG_BYTES = 5_000
PNG_MAGIC = b"\x89PNG"
EXPECTED_PLOTS = set(report.PLOT_FILES.values())

PRESETS = (
    "smoke",
    "digits_default",
    "panel_digits",
    "panel_fashion_mnist",
    "paper_cifar10_iid",
    "paper_cifar10_noniid",
    "ssl_bench",
)
README_OVERRIDES = (
    "gate=rangate",
    "gate=rollgate gate.roll_order=shuffled",
    "fe=fedsc fe.share_correlation=true fe.correlation_noise=0.01",
    "partition=iid",
    "partition=pathological partition.classes_per_client=3",
    "topology=ring",
    "topology=regular topology.degree=3",
    "expert=with_shared",
    "expert=with_shared expert.local_head=true expert.local_head_init=stage1 gate=knowgate "
    "gate.know_own_share=true",
    "seed=3",
)
BAD_OVERRIDES = (  # (override, pattern the error message must contain)
    ("gate.k=0", r"config key 'gate\.k'"),
    ("gate.method=nosuch", r"config key 'gate\.method'"),
    ("fe.rounds=many", r"config key 'fe\.rounds'"),
    ("partition.alpha=-1", r"config key 'partition\.alpha'"),
    ("gate=nosuch", r"options in 'gate'"),
    ("nosuchkey=1", r"config key 'nosuchkey'"),
)


# ---------------------------------------------------------------------------- config
def test_every_preset_is_tested() -> None:
    assert {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset: str) -> None:
    cfg = compose_config([f"experiment={preset}"])
    assert "hydra" not in cfg
    assert cfg.simulation.num_clients > 0


def test_presets_apply_their_values() -> None:
    assert compose_config(["experiment=smoke"]).simulation.num_clients == 4
    paper = compose_config(["experiment=paper_cifar10_noniid"])
    assert (paper.dataset.name, paper.model.extractor, paper.fe.method, paper.partition.kind) == (
        "cifar10",
        "resnet",
        "fedsc",
        "dirichlet",
    )
    panel = compose_config(["experiment=panel_digits"])
    assert "oracle_router" in panel.baselines and panel.fe.patience > 0


def test_all_baselines_expand_to_every_baseline_and_registered_gate() -> None:
    cfg = compose_config(["experiment=digits_default", "baselines=[all]"])
    assert list(cfg.baselines) == list(BASELINES)
    assert set(gates.names()) <= set(cfg.baselines)
    assert list(compose_config(["experiment=panel_digits"]).baselines) == list(BASELINES)
    with pytest.raises(ConfigError, match="baselines"):
        compose_config(["baselines=[fedavg,everything]"])


@pytest.mark.parametrize("overrides", README_OVERRIDES)
def test_readme_override_composes(overrides: str) -> None:
    cfg = compose_config(overrides.split())
    for override in overrides.split():
        key, value = override.split("=")
        if not (CONF_DIR / key).is_dir():  # a value, not a config group choice
            assert str(OmegaConf.select(cfg, key)).lower() == value


def test_group_choice_sets_method() -> None:
    assert compose_config(["gate=rollgate"]).gate.method == "rollgate"
    assert compose_config(["fe=fedsc"]).fe.method == "fedsc"
    assert compose_config(["expert=with_shared"]).expert.shared_expert is True


@pytest.mark.parametrize(("override", "pattern"), BAD_OVERRIDES)
def test_wrong_value_names_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        compose_config([override])


# --------------------------------------------------------------------- sweep summary on fake jobs
def _fake_job(
    job_dir: Path, seed: int, local: float, global_: float, overrides: list[str] | None
) -> None:
    job_dir.mkdir(parents=True)
    results = {
        "config": {"seed": seed, "gate": {"method": "rangate"}, "output_dir": str(job_dir)},
        "accuracy": {"nmoe": {"mean": local, "per_client": [local]}},
        "accuracy_global": {"nmoe": {"mean": global_, "per_client": [global_]}},
    }
    (job_dir / report.RESULTS_FILE).write_text(json.dumps(results))
    if overrides is not None:
        (job_dir / ".hydra").mkdir()
        (job_dir / report.OVERRIDES_FILE).write_text(yaml.safe_dump(overrides))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_summarize_sweep_groups_seeds(tmp_path: Path) -> None:
    values = {0: (0.5, 0.6), 1: (0.7, 0.9)}
    for seed, (local, glob) in values.items():
        _fake_job(tmp_path / str(seed), seed, local, glob, ["gate=rangate", f"seed={seed}"])
    csv_path, md_path = report.summarize_sweep(tmp_path)
    rows = _read_csv(csv_path)
    assert len(rows) == 1
    row = rows[0]
    assert (row["group"], row["method"], row["n_seeds"], row["seeds"]) == (
        "gate=rangate",
        "nmoe",
        "2",
        "0 1",
    )
    locals_ = [v[0] for v in values.values()]
    globals_ = [v[1] for v in values.values()]
    assert float(row["local_mean"]) == pytest.approx(statistics.fmean(locals_))
    assert float(row["local_std"]) == pytest.approx(statistics.stdev(locals_))
    assert float(row["global_mean"]) == pytest.approx(statistics.fmean(globals_))
    assert float(row["global_std"]) == pytest.approx(statistics.stdev(globals_))
    assert "gate=rangate" in md_path.read_text()


def test_summarize_sweep_without_overrides_groups_by_config(tmp_path: Path) -> None:
    _fake_job(tmp_path / "a", 0, 0.5, 0.5, None)
    _fake_job(tmp_path / "b", 1, 0.7, 0.7, None)
    rows = _read_csv(report.summarize_sweep(tmp_path)[0])
    assert [(r["group"], r["n_seeds"]) for r in rows] == [(report.NO_OVERRIDES_LABEL, "2")]


def test_report_cli_errors_on_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code != 0
    with pytest.raises(FileNotFoundError, match="results.json"):
        report.summarize_sweep(tmp_path)


# ---------------------------------------------------------------------------- one real multirun
@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nmoe -m ... seed=0,1`: two real in-process simulations, run once for this module."""
    workdir = tmp_path_factory.mktemp("cli")
    sweep = workdir / "sweep"
    command = [
        str(NMOE_CLI),
        "-m",
        *FAST_OVERRIDES,
        "seed=" + ",".join(map(str, SEEDS)),
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep


def test_multirun_writes_one_result_per_job(sweep_dir: Path) -> None:
    paths = report.find_results(sweep_dir)
    assert len(paths) == len(SEEDS)
    seeds = sorted(load_results(p)["config"]["seed"] for p in paths)
    assert seeds == list(SEEDS)
    for path in paths:
        assert {p.name for p in path.parent.glob("*.png")} == EXPECTED_PLOTS


def test_multirun_summary_aggregates_both_seeds(sweep_dir: Path) -> None:
    rows = {r["method"]: r for r in _read_csv(sweep_dir / report.SUMMARY_CSV)}
    assert {"nmoe", "local_expert"} <= set(rows)
    assert {r["group"] for r in rows.values()} == {" ".join(sorted(FAST_OVERRIDES))}
    for row in rows.values():
        assert row["n_seeds"] == str(len(SEEDS))
        assert 0.0 <= float(row["local_mean"]) <= 1.0
    jobs = [load_results(p) for p in report.find_results(sweep_dir)]
    nmoe_local = [job["accuracy"]["nmoe"]["mean"] for job in jobs]
    assert float(rows["nmoe"]["local_mean"]) == pytest.approx(statistics.fmean(nmoe_local))
    summary_md = (sweep_dir / report.SUMMARY_MD).read_text()
    assert "| nmoe | 2 | 0 1 |" in summary_md


def test_write_plots_on_real_results(sweep_dir: Path, tmp_path: Path) -> None:
    results = load_results(report.find_results(sweep_dir)[0])
    paths = report.write_plots(tmp_path, results)
    assert {p.name for p in paths} == EXPECTED_PLOTS
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > MIN_PNG_BYTES


def test_report_cli_regenerates_sweep(sweep_dir: Path) -> None:
    (sweep_dir / report.SUMMARY_MD).unlink()
    assert report.main([str(sweep_dir)]) == 0
    assert (sweep_dir / report.SUMMARY_MD).is_file()
