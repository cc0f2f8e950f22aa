"""NMoE ServerApp: composes the config and runs the algorithm, stage by stage.

    set-up -> stage 1 (F) -> stage 2 (experts) -> stage 3 (gates) -> baselines -> evaluation

Each stage is timed, its bytes counted, results.json rewritten and a checkpoint written after it.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from nmoe import gates
from nmoe.config import FEDAVG_MODEL_BASELINES, compose_config, parse_overrides
from nmoe_protocol import messages as wire

from .report import RESULTS_FILE, write_plots
from .run import Run, StageFailed, open_run
from .stages import baselines, evaluation, experts, extractor, serving
from .stages import gates as gate_stage

STAGE1_NAMES = {"fedce": "fe_ce", "fedsc": "fe_sc", "hybrid": "fe_hybrid"}


def run_stages(run: Run) -> None:
    """Stages 1-3, baselines and evaluation (or, in `mode=inference`, the evaluation only)."""
    cfg = run.cfg
    nmoe_gate = str(cfg.gate.method)
    if cfg.mode == "serve":
        run.stage("serve", lambda: serving.serve(run))
        return
    if cfg.mode == "inference":
        run.stage("evaluate_local", lambda: evaluation.evaluate_local(run))
        run.stage("inference", lambda: evaluation.evaluate_routed(run, [nmoe_gate], nmoe_gate))
        return

    method, stage1 = str(cfg.fe.method), STAGE1_NAMES[str(cfg.fe.method)]
    fe = run.resumable(stage1, lambda: extractor.train_extractor(run, method, stage1), keep=True)
    fedavg = None
    plain_fedce = (
        method == "fedce" and float(cfg.fe.logit_adjust) == 0 and float(cfg.fe.server_momentum) == 0
    )
    with_fedavg = set(FEDAVG_MODEL_BASELINES) & set(cfg.baselines)
    if with_fedavg and not plain_fedce:  # FedAvg: a plain FedCE run of its own
        fedavg = run.resumable(
            "baseline_fedavg",
            lambda: extractor.train_extractor(run, "fedce", "baseline_fedavg", "fedavg"),
            keep=True,
        )

    heads = [wire.LOCAL_HEAD_STATE] if cfg.expert.local_head else []
    if not all(resumed_on_clients(run, "expert", g) for g in [wire.EXPERT_STATE, *heads]):
        trained = extractor.initial_bundle(run, method)[1]
        run.stage("expert", lambda: experts.train_experts(run, fe, trained))
    if "shared_fe_own_head" in cfg.baselines:
        run.stage("baseline_own_head", lambda: baselines.train_own_heads(run))

    gate_names = [nmoe_gate] + [g for g in gates.names() if g in cfg.baselines and g != nmoe_gate]
    to_train = [
        gates.get(g)
        for g in gate_names
        if gates.get(g).trainable and not resumed_on_clients(run, g, wire.gate_state(g))
    ]
    if to_train and not run.stage("gate_cache", lambda: gate_stage.fill_gate_cache(run)):
        to_train, gate_names = no_gate_cache(run, to_train, gate_names, nmoe_gate)
    for gate in to_train:
        run.stage(gate.name, lambda gate=gate: gate_stage.train_gate(run, gate))

    if "local_only" in cfg.baselines:
        run.resumable("baseline_local_only", lambda: baselines.local_only(run))
    if "centralized" in cfg.baselines:
        run.resumable("baseline_centralized", lambda: baselines.centralized(run))

    def evaluate_local() -> None:
        if fedavg is not None:
            experts.install(
                run, "fedavg", {k: fedavg[k] for k in extractor.initial_bundle(run, "fedce")[1]}
            )
        evaluation.evaluate_local(run)

    run.stage("evaluate_local", evaluate_local)
    run.stage("inference", lambda: evaluation.evaluate_routed(run, gate_names, nmoe_gate))


def no_gate_cache(
    run: Run, to_train: list, gate_names: list[str], nmoe_gate: str
) -> tuple[list, list[str]]:
    """No client could cache its experts' outputs (every node keeps its `gate` split): the
    trainable baseline gates are skipped; a trainable configured gate cannot be trained."""
    reason = (
        "no client cached its experts' outputs on its 'gate' split (a node whose config "
        "share-splits keeps that split refuses): nothing to train on"
    )
    if any(g.name == nmoe_gate for g in to_train):
        raise StageFailed(f"gate '{nmoe_gate}': {reason}; use gate=knowgate or gate=rangate")
    for gate in to_train:
        run.results.set_extra_item("skipped", gate.name, reason)
    skipped = {g.name for g in to_train}
    return [], [g for g in gate_names if g not in skipped]


def resumed_on_clients(run: Run, stage: str, group: str) -> bool:
    """A client-side stage is skipped on resume only if every client still holds its result."""
    return stage in run.checkpoint.completed and run.clients_hold(group)


def run_job(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run one configured job on `grid` and return the results written to results.json."""
    if int(cfg.torch_threads) > 0:
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(str(cfg.output_dir)).expanduser().resolve()
    run = open_run(grid, cfg, output_dir)
    try:
        run_stages(run)
    except Exception as err:  # stop cleanly: whatever was measured so far is kept, with the reason
        run.results.mark_failed(err)
        run.results.write(output_dir)
        log(ERROR, "Run failed: %s (partial results in %s)", err, output_dir / RESULTS_FILE)
        raise
    run.results.mark_completed()
    path = run.results.write(output_dir)
    plots = write_plots(output_dir, run.results.data)
    log(INFO, "Results written to %s (%d plots beside it)", path, len(plots))
    return run.results.data


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp for a fixed config (Hydra CLI), or one that composes it from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        overrides = parse_overrides(str(context.run_config.get("overrides", "")))
        run_job(grid, cfg if cfg is not None else compose_config(overrides))

    return server_app


app = make_server_app()
