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
from .gates import route_requests

EVAL_SPLITS = ("test", "global")


def routed_accuracy(run: Run, gate: str, splits: list[str]) -> list[dict[int, dict[str, Any]]]:
    """One routed query per client over all `splits` in one set of waves; per split (in order)
    each client's report. Records latency, failures and (optionally) predictions."""
    record = bool(run.cfg.record_predictions)
    started = time.perf_counter()
    query = f"{gate}-{uuid.uuid4().hex[:8]}"
    outcome = run.router.run(
        route_requests(run, query, splits, "infer", gate, int(run.cfg.seed)),
        return_predictions=record,
    )
    seconds = time.perf_counter() - started
    per_split: list[dict[int, dict[str, Any]]] = []
    for i in range(len(splits)):
        per_split.append(
            {
                pid: {
                    "num-examples": r.num_examples[i],
                    "accuracy": r.accuracy[i],
                    "degraded": r.degraded[i],
                    "answered-locally": r.answered_locally[i],
                    "route-counts": r.route_counts_of(i),
                    **({"predictions": r.predictions_of(i)} if r.predictions is not None else {}),
                }
                for pid, r in outcome.reports.items()
            }
        )
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
    for gate in gate_names:
        local, glob = routed_accuracy(run, gate, list(EVAL_SPLITS))
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
        log(
            INFO,
            "[evaluate] %s: local %.4f | global %.4f",
            gate,
            np.mean(list(local_acc.values())),
            np.mean(list(global_acc.values())),
        )
    run.results.set("routing_counts", routing)


def evaluate_local(run: Run) -> None:
    """Methods answered on each client alone: own expert, F + global head, F + own head."""
    methods = ["local_expert"] + [
        m for m in ("fedavg", "shared_fe_own_head") if m in run.cfg.baselines
    ]
    replies = run.broadcast(wire.EvaluateRequest(methods=methods), wire.Accuracies)
    for i, method in enumerate(methods):
        local = {p: r.acc_local[i] for p, r in replies.items()}
        glob = {p: r.acc_global[i] for p, r in replies.items()}
        run.results.set_accuracy(method, local, glob)
        log(
            INFO,
            "[evaluate] %s: local %.4f | global %.4f",
            method,
            np.mean(list(local.values())),
            np.mean(list(glob.values())),
        )
