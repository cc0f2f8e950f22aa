"""NMoE ServerApp: composes the config, runs stages 1-3, baselines and evaluation."""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from nmoe.config import compose_config, parse_overrides

from .report import RESULTS_FILE, write_plots
from .stages import open_run, run_all


def run_job(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run one configured job on `grid` and return the results written to results.json."""
    if int(cfg.torch_threads) > 0:
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(str(cfg.output_dir)).expanduser().resolve()
    run = open_run(grid, cfg, output_dir)
    try:
        results = run_all(run)
    except Exception as err:  # stop cleanly: whatever was measured so far is kept, with the reason
        run.results.data["status"] = "failed"
        run.results.data["error"] = f"{type(err).__name__}: {err}"
        run.results.write(output_dir)
        log(ERROR, "Run failed: %s (partial results in %s)", err, output_dir / RESULTS_FILE)
        raise
    run.results.data["status"] = "completed"
    path = run.results.write(output_dir)
    plots = write_plots(output_dir, results)
    log(INFO, "Results written to %s (%d plots beside it)", path, len(plots))
    return results


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp for a fixed config (Hydra CLI), or one that composes it from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = (
            cfg
            if cfg is not None
            else compose_config(parse_overrides(str(context.run_config.get("overrides", ""))))
        )
        run_job(grid, config)

    return server_app


app = make_server_app()
