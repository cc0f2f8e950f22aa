"""Evaluation: methods each client answers alone (`evaluate`), and routed inference for every
gate, the local test split and the balanced global test set in one set of waves."""

from __future__ import annotations

import time
import uuid
from logging import INFO
from typing import Any

import numpy as np
from flwr.common import log

from nmoe_protocol import messages as wire

from ..run import Run
from .gates import held_splits, route_requests

EVAL_SPLITS = ("test", "global")
ORACLE = "oracle_router"  # measurement only: the best reachable expert for each true label


def routed_accuracy(
    run: Run, gate: str, splits: list[str], mode: str = "infer"
) -> list[dict[int, dict[str, Any]]]:
    """One routed query per client over all `splits` in one set of waves; per split (in order)
    each client's report. Records latency, failures and (optionally) predictions."""
    record = bool(run.cfg.record_predictions)
    started = time.perf_counter()
    query = f"{gate}-{uuid.uuid4().hex[:8]}"
    outcome = run.router.run(
        route_requests(run, query, splits, mode, gate, int(run.cfg.seed)),
        return_predictions=record,
    )
    seconds = time.perf_counter() - started
    per_split: list[dict[int, dict[str, Any]]] = [{} for _ in splits]
    for pid, r in outcome.reports.items():
        for position, i in enumerate(held_splits(run, pid, splits)):
            per_split[i][pid] = {
                "num-examples": r.num_examples[position],
                "accuracy": r.accuracy[position],
                "degraded": r.degraded[position],
                "answered-locally": r.answered_locally[position],
                "route-counts": r.route_counts_of(position),
                **(
                    {"predictions": r.predictions_of(position)} if r.predictions is not None else {}
                ),
            }
    samples = sum(sum(r.num_examples) for r in outcome.reports.values())
    run.results.set_item(
        "inference_latency",
        gate,
        {
            "splits": list(splits),
            "seconds": round(seconds, 4),
            "samples": samples,
            "ms_per_sample": round(1000 * seconds / max(samples, 1), 4),
        },
    )
    if record:
        for split, metrics in zip(splits, per_split, strict=True):
            run.results.data.setdefault("predictions", {}).setdefault(gate, {})[split] = {
                str(p): m["predictions"] for p, m in metrics.items()
            }
    if outcome.failed_experts or outcome.failed_requesters:
        run.results.append_extra(
            "inference_failures",
            {
                "gate": gate,
                "splits": list(splits),
                "failed_experts": outcome.failed_experts,
                "failed_requesters": outcome.failed_requesters,
            },
        )
    return per_split


def evaluate_routed(run: Run, gate_names: list[str], nmoe_gate: str) -> None:
    """Routed inference for each gate: local tests and the global test in one set of waves."""
    routing = {}
    measured = list(gate_names) + ([ORACLE] if ORACLE in run.cfg.baselines else [])
    for gate in measured:
        mode = "oracle" if gate == ORACLE else "infer"
        local, glob = routed_accuracy(run, gate, list(EVAL_SPLITS), mode)
        local_acc = {p: float(m["accuracy"]) for p, m in local.items()}
        global_acc = {p: float(m["accuracy"]) for p, m in glob.items()}
        routing[gate] = {str(p): list(m["route-counts"]) for p, m in local.items()}
        for metric in ("degraded", "answered-locally"):
            counts = {
                split: sum(int(m[metric]) for m in replies.values())
                for split, replies in zip(EVAL_SPLITS, (local, glob), strict=True)
            }
            run.results.set_extra_item(f"{metric.replace('-', '_')}_queries", gate, counts)
        for name in {gate, "nmoe"} if gate == nmoe_gate else {gate}:
            run.results.set_accuracy(name, local_acc, global_acc)
        _log_accuracy(gate, local_acc, global_acc)
    run.results.set("routing_counts", routing)


def evaluate_local(run: Run) -> None:
    """Methods answered on each client alone: own expert, local head, the device's own model
    where it is the mean of the two, F + global head (alone and moved to each task's label
    prior), F + own head."""
    methods = ["local_expert"] + (["local_head"] if run.cfg.expert.local_head else [])
    if run.cfg.expert.local_head and run.cfg.expert.own_model == "head_and_expert":
        methods.append("own_model")
    methods += [
        m for m in ("fedavg", "fedavg_task_prior", "shared_fe_own_head") if m in run.cfg.baselines
    ]
    replies = run.broadcast(wire.EvaluateRequest(methods=methods), wire.Accuracies)
    for i, method in enumerate(methods):
        local = {p: r.acc_local[i] for p, r in replies.items()}
        glob = {p: r.acc_global[i] for p, r in replies.items() if r.acc_global}
        run.results.set_accuracy(method, local, glob)
        _log_accuracy(method, local, glob)


def _log_accuracy(method: str, local: dict[int, float], glob: dict[int, float]) -> None:
    log(
        INFO,
        "[evaluate] %s: local %.4f | global %.4f",
        method,
        np.mean(list(local.values())),
        np.mean(list(glob.values())) if glob else float("nan"),
    )
