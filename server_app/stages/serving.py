"""Serving (`mode=serve`): a long-lived run that answers what lands in the devices' inboxes.

Every `serve.interval_s`, one set of routed waves over every device's inbox (coalesced: one
query per device however many files wait). Devices with nothing waiting answer the first wave
empty and drop out of that set. Predictions are written on the devices (their outboxes); the
server learns only how many inputs each device had answered.
"""

from __future__ import annotations

import time
import uuid
from logging import INFO

from flwr.common import log

from ..run import Run
from .gates import route_requests

INBOX = ["inbox"]


def serve(run: Run) -> None:
    cfg = run.cfg
    gate, interval = str(cfg.gate.method), float(cfg.serve.interval_s)
    duration = float(cfg.serve.duration_s) or float("inf")
    stop = time.monotonic() + duration
    answered: dict[str, int] = {str(p): 0 for p in run.pids}
    polls, busy, seconds = 0, 0, []
    while time.monotonic() < stop:
        started = time.monotonic()
        query = f"serve-{uuid.uuid4().hex[:8]}"
        outcome = run.router.run(route_requests(run, query, INBOX, "serve", gate, int(cfg.seed)))
        polls += 1
        if outcome.reports:
            busy += 1
            seconds.append(round(time.monotonic() - started, 4))
            for pid, report in outcome.reports.items():
                answered[str(pid)] += sum(report.num_examples)
            log(
                INFO,
                "[serve] poll %d: %s answered (%.2fs)",
                polls,
                {p: sum(r.num_examples) for p, r in outcome.reports.items()},
                seconds[-1],
            )
        run.results.set_extra(
            "serving",
            {
                "polls": polls,
                "polls_with_inputs": busy,
                "answered": answered,
                "seconds_per_set": seconds,
            },
        )
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
