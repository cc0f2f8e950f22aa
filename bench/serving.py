"""Serving latency: from an image file landing in a device's inbox to its prediction in the outbox.

    python bench/serving.py            # 3 SuperNodes, 40 images, one every 0.5 s
    python bench/serving.py --tiny     # 2 SuperNodes, 1-round training, 6 images

One loopback deployment (scripts/local_deployment.Deployment, warm executors) trains
`JOB state_key=bench-serving`; then node 0 runs `nmoe-device serve` (as `python -m
client_app.device serve`, the same node config as its SuperNode, --interval 0.2) beside a
long-lived `mode=serve` run (serve.interval_s=1). Node 0's local test images land in its inbox
as raw-pixel .npy files (written to a temp name, then renamed), one every `--every` seconds.
The device answers the familiar ones at once; the others go to `<inbox>/federated/` and are
answered by the serve run's next set of waves. The outbox is polled every 0.02 s: latency is
the time its entry appeared minus the time the file was renamed into the inbox.

Writes bench/results/serving.json: per path (`answered_by`: device, federation) count, min /
median / p90 (nearest rank) / max latency and accuracy against the test labels; every file;
the serve run's `extra.serving` (polls, seconds per set of waves); load average before/after.
Run folders go to outputs/bench/serving/ (never inside bench/results/: `flwr run .` packs it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
from benchlib import base_parser, machine_info, median, write_result

sys.path.insert(0, str(benchlib.REPO_ROOT))  # scripts/ is not an installed package
from scripts.local_deployment import COMPLETED_STATUS, Deployment, spawn, stop_process

NAME = "serving"
STATE_KEY = "bench-serving"
JOB = (
    "experiment=smoke partition=dirichlet partition.alpha=0.3 expert=with_shared gate=knowgate "
    f"gate.local_first_quantile=0.7 state_key={STATE_KEY} baselines=[]"
)
TINY_JOB = "fe.rounds=1 expert.shared_rounds=1 expert.epochs=1 gate.rounds=1"
DEFAULTS = {"nodes": 3, "images": 40, "margin": 90.0}
TINY = {"nodes": 2, "images": 6, "margin": 60.0}
DEVICE, DEVICE_INTERVAL_S, SERVE_INTERVAL_S, OUTBOX_POLL_S = 0, 0.2, 1.0, 0.02
READY_TIMEOUT_S, RUN_TIMEOUT_S = 300.0, 3600.0
RUN_ROOT = benchlib.REPO_ROOT / "outputs" / "bench" / NAME


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=DEFAULTS["nodes"])
    parser.add_argument("--images", type=int, default=DEFAULTS["images"], help="files dropped")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between two files")
    parser.add_argument(
        "--margin", type=float, default=DEFAULTS["margin"], help="serve.duration_s beyond the drops"
    )
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def test_images(overrides: str, nodes: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Node 0's local test images as raw pixels (the form a camera gives) and their labels."""
    from nmoe.config import compose_config
    from nmoe.data import federation_spec, load_client_data
    from nmoe.datasets import dataset_info

    cfg = compose_config(overrides.split())
    data, _ = load_client_data(federation_spec(cfg), DEVICE, nodes)
    info = dataset_info(str(cfg.dataset.name))
    images = data.test_x.numpy()[:count]
    raw = images * np.array(info.std)[:, None, None] + np.array(info.mean)[:, None, None]
    return np.rint(raw * info.pixel_max).astype(np.uint8), data.test_y.numpy()[:count]


def wait_for(what: str, ready: Any, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout}s")
        time.sleep(1.0)


def drop_and_watch(
    inbox: Path, outbox: Path, images: np.ndarray, every: float, until: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Drop the images one every `every` s (temp file + rename) while polling the outbox, until
    every file is answered or `until` (monotonic); (landed, answered) wall-clock times by name."""
    landed: dict[str, float] = {}
    answered: dict[str, float] = {}
    start = time.monotonic()
    while len(answered) < len(images) and time.monotonic() < until:
        due = int((time.monotonic() - start) // every) + 1
        for i in range(len(landed), min(due, len(images))):
            name = f"img-{i:04d}.npy"
            temp = inbox.parent / f".{name}.part"  # same file system, outside the inbox
            with temp.open("wb") as handle:
                np.save(handle, images[i])
            os.replace(temp, inbox / name)
            landed[name] = time.time()
        for entry in os.listdir(outbox) if outbox.is_dir() else []:
            name = entry.removesuffix(".json")
            if entry.endswith(".json") and name in landed and name not in answered:
                answered[name] = time.time()
        time.sleep(OUTBOX_POLL_S)
    return landed, answered


def stats(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    pick = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest-rank p90
    values = {"min_s": ordered[0], "median_s": median(ordered), "p90_s": pick, "max_s": ordered[-1]}
    return {"count": len(ordered), **{k: round(v, 3) for k, v in values.items()}}


def run_bench(args: Any, workdir: Path) -> dict[str, Any]:
    job = f"{JOB} {TINY_JOB}" if args.tiny else JOB
    duration = round(args.images * args.every + args.margin, 1)
    serve = f"{job} mode=serve serve.interval_s={SERVE_INTERVAL_S} serve.duration_s={duration}"
    images, labels = test_images(job, args.nodes, args.images)
    out: dict[str, Any] = {}
    started = time.monotonic()
    with Deployment(workdir, args.nodes) as deployment:
        out["startup_s"] = round(time.monotonic() - started, 1)
        print(f"[serving] {args.nodes} nodes up in {out['startup_s']}s; training", flush=True)
        mark = time.monotonic()
        status, train_id = deployment.run(
            f"{job} output_dir={workdir / 'out-train'}", RUN_TIMEOUT_S
        )
        if status != COMPLETED_STATUS:
            raise RuntimeError(f"training run {train_id}: {status}\n{deployment.logs(train_id)}")
        out["train_wall_s"] = round(time.monotonic() - mark, 1)
        node = deployment.nodes[DEVICE]
        node_config = (
            f"partition-id={DEVICE} num-partitions={args.nodes} state-dir='{node.state_dir}'"
        )
        device_log = deployment.logs_dir / "device-0.log"
        device = spawn(
            [sys.executable, "-m", "client_app.device", "serve", "--node-config", node_config]
            + ["--state-key", STATE_KEY, "--interval", str(DEVICE_INTERVAL_S)],
            deployment.env(deployment.home),
            device_log,
        )
        try:
            wait_for("nmoe-device", lambda: _serving(device, device_log))
            serve_id = deployment.submit(f"{serve} output_dir={workdir / 'out-serve'}")
            wait_for("serve run", lambda: "[serve] started" in deployment.logs(serve_id))
            print(f"[serving] run {serve_id} serves; dropping {len(images)} images", flush=True)
            until, load_before = time.monotonic() + duration, list(os.getloadavg())
            landed, answered = drop_and_watch(
                node.state_dir / "inbox", node.state_dir / "outbox", images, args.every, until
            )
            out["load_average_while_serving"] = [load_before, list(os.getloadavg())]
            status = deployment.wait(serve_id, duration + RUN_TIMEOUT_S)
        finally:
            stop_process(device)
    if status != COMPLETED_STATUS:
        raise RuntimeError(f"serve run {serve_id}: {status}")
    outbox = node.state_dir / "outbox"
    files = []
    for i, name in enumerate(sorted(landed)):
        entry = json.loads((outbox / f"{name}.json").read_text()) if name in answered else {}
        files.append(
            {
                "file": name,
                "label": int(labels[i]),
                "prediction": entry.get("prediction"),
                "answered_by": entry.get("answered_by"),
                "latency_s": round(answered[name] - landed[name], 3) if name in answered else None,
                "outbox_latency_s": entry.get("latency_s"),  # the product's own, from the mtime
            }
        )
    paths = {}
    for path in ("device", "federation"):
        mine = [f for f in files if f["answered_by"] == path]
        right = sum(f["prediction"] == f["label"] for f in mine)
        paths[path] = {
            **stats([f["latency_s"] for f in mine]),
            "accuracy": round(right / len(mine), 3) if mine else None,
        }
    served = json.loads((workdir / "out-serve" / "results.json").read_text())
    return {
        **out,
        "paths": paths,
        "unanswered": [f["file"] for f in files if f["answered_by"] is None],
        "serve_run": {**served["extra"]["serving"], "wall_time_s": served.get("wall_time_s")},
        "serve_duration_s": duration,
        "device_service": device_counts(device_log),
        "files": files,
    }


def device_counts(log: Path) -> dict[str, int]:
    """What `nmoe-device serve` logged: files it answered, files it handed to the federation."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return {key: sum(x[key] for x in lines) for key in ("device", "federated")}


def _serving(device: Any, log: Path) -> bool:
    if device.poll() is not None:
        raise RuntimeError(f"nmoe-device exited with {device.returncode}: {log.read_text()}")
    return log.is_file() and "nmoe-device: serving" in log.read_text()


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # finally: stop
    started_machine = machine_info()
    inside = args.out_dir.resolve().is_relative_to(benchlib.REPO_ROOT)
    workdir = (RUN_ROOT if inside else args.out_dir / "runs" / NAME) / (
        "tiny" if args.tiny else "full"
    )
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.monotonic()
    measured = run_bench(args, workdir)
    config = {
        "nodes": args.nodes,
        "images": args.images,
        "every_s": args.every,
        "device_interval_s": DEVICE_INTERVAL_S,
        "serve_interval_s": SERVE_INTERVAL_S,
        "outbox_poll_s": OUTBOX_POLL_S,
        "job": f"{JOB} {TINY_JOB}" if args.tiny else JOB,
        "executor": "warm",
        "tiny": args.tiny,
        "workdir": str(workdir),
    }
    result = {"config": config, "wall_s": round(time.monotonic() - started, 1), **measured}
    result["notes"] = [
        "latency_s: outbox entry seen (polled every outbox_poll_s) minus the rename into the "
        "inbox; outbox_latency_s: the product's own figure (file mtime to prediction written).",
        "federation: handed to <inbox>/federated/ by the device, answered by the serve run's "
        "next set of waves (route, expert, combine); serve_run.seconds_per_set: its sets with "
        "inputs. A SuperNode pulls 3 s after its last empty pull (flwr 1.42): seconds per wave.",
        "device_service: the files nmoe-device answered / handed over; a file the serve run "
        "claimed from <inbox>/ before the device looked at it is in neither.",
        "The machine is shared with other jobs: see the load averages (machine: at the start, "
        "load_average_while_serving: before the first drop and after the last answer).",
    ]
    path = write_result(args.out_dir, NAME, result, started_machine)
    print(f"[serving] {json.dumps(measured['paths'])}\n{path}", flush=True)


if __name__ == "__main__":
    main()
