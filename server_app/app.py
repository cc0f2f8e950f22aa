"""NMoE ServerApp: composes the config, runs stages 1-3, baselines and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from nmoe.config import compose_config, parse_overrides

from .stages import open_run, run_all


def run_job(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run one configured job on `grid` and return the results written to results.json."""
    if int(cfg.torch_threads) > 0:
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(str(cfg.output_dir)).expanduser().resolve()
    run = open_run(grid, cfg, output_dir)
    return run_all(run)


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp for a fixed config (Hydra CLI), or one that composes it from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg if cfg is not None else compose_config(parse_overrides(str(context.run_config.get("overrides", ""))))
        run_job(grid, config)

    return server_app


app = make_server_app()
