"""Hydra CLI (`nmoe`): runs the whole NMoE job in an in-process Flower simulation.

    nmoe experiment=smoke gate=rangate           # one job, output in Hydra's run dir
    nmoe -m gate=rangate,fedgate seed=0,1        # a sweep: one results.json per job

Each job writes results.json and its plots into its Hydra output dir (or into
`output_dir` when that is set on the command line). After a multirun the
`SweepSummary` callback (registered in conf/config.yaml under `hydra.callbacks`)
writes summary.csv and summary.md into the sweep dir.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from client_app.app import app as client_app
from nmoe.config import CONF_DIR, register_schema, to_structured

from .app import make_server_app
from .report import RESULTS_FILE, summarize_sweep

OUTPUT_DIR_KEY = "output_dir"

log = logging.getLogger(__name__)


def override_keys(overrides: list[str]) -> set[str]:
    """Config keys set by Hydra overrides (`+a.b=1`, `~a`, `a=1,2` -> `a.b`, `a`, `a`)."""
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides}


def backend_config(cfg: DictConfig) -> dict[str, Any]:
    """Flower simulation backend config: CPUs per client and, if set, the Ray cluster to join."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": float(cfg.simulation.client_cpus)}}
    if cfg.simulation.ray_address:
        config["init_args"] = {"address": str(cfg.simulation.ray_address)}
    return config


def run_job(cfg: DictConfig) -> Path:
    """Simulate `cfg.simulation.num_clients` SuperNodes running the job (the ServerApp writes
    results.json and the plots); return the output dir."""
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app,
        num_supernodes=int(cfg.simulation.num_clients),
        backend_config=backend_config(cfg),
    )
    output_dir = Path(str(cfg.output_dir)).expanduser().resolve()
    if not (output_dir / RESULTS_FILE).is_file():
        raise RuntimeError(
            f"the simulation wrote no {RESULTS_FILE} in {output_dir}: see the log above"
        )
    log.info("Results and plots in %s", output_dir)
    return output_dir


register_schema()  # conf/config.yaml's defaults name the typed schema


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    """Entry point of `nmoe`: validate the composed config, pick the output dir, run the job."""
    cfg = to_structured(raw)
    hydra_cfg = HydraConfig.get()
    if OUTPUT_DIR_KEY not in override_keys(list(hydra_cfg.overrides.task)):
        cfg.output_dir = str(hydra_cfg.runtime.output_dir)
    run_job(cfg)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, summarise every job's accuracy over seeds."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write summary.csv and summary.md into the sweep dir."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            csv_path, md_path = summarize_sweep(sweep_dir)
        except FileNotFoundError as err:  # every job wrote to an explicit output_dir elsewhere
            log.warning("No sweep summary: %s", err)
            return
        log.info("Sweep summary: %s, %s", csv_path, md_path)
