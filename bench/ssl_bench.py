"""Self-supervision benchmark: what each stage-1 method gives F and NMoE, with few labels.

    python bench/ssl_bench.py                                   # the issue's grid (see GRID)
    python bench/ssl_bench.py --cells fashion_mnist:1.0,fashion_mnist:0.1 --seeds 0  # a part
    python bench/ssl_bench.py --skip-run                        # re-analyse the run folder
    python bench/ssl_bench.py --tiny                            # smoke size (numbers meaningless)
    python bench/ssl_bench.py --probe-only ...  # stage 1 and its probe only, in-process

`--probe-only` runs no `nmoe` job: stage 1 is FedAvg over the same clients in this process with
the same torch code as the ClientApp (`nmoe.training.train_extractor` with the run config's
schedule, optimiser, augmentation and label mask), a fixed `fe.rounds` (no patience, no shared
correlations), and the same probe every round (rows `probe_only`: no nmoe accuracies).

One job is one `nmoe` run of conf/experiment/ssl_bench.yaml (the main job's NMoE on 10 clients,
Dirichlet 0.3; Fashion-MNIST at the panel preset's 3,000-image subsample and CNN stride unless
`--dataset-overrides` says otherwise) with one stage-1 method (`fe=fedce|fedsc|hybrid`, each with
its own conf/fe schedule), one `dataset.label_fraction` and one seed. Each job reports the linear
probe of its final F (`extra.probe.<stage>`: nmoe/probe.py, pooled labelled training images ->
global test set) and of the randomly initialised F (`extra.probe.random_init`, the reference row:
the same seeded initialisation and probe data for every method of a cell), and nmoe's local and
global accuracy. Writes bench/results/ssl.json (machine, load, commit, every job's config, the
table, the issue's bars) and ssl.md (the README's table); job folders stay in <out-dir>/runs/ssl/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import base_parser, machine_info, mean_std, write_result

NAME = "ssl"
METHODS = ("fedce", "fedsc", "hybrid")
STAGES = {"fedce": "fe_ce", "fedsc": "fe_sc", "hybrid": "fe_hybrid"}
SSL_METHODS = ("fedsc", "hybrid")
# (dataset, label fraction) cells of the issue: Fashion-MNIST at 1.0 / 0.1 / 0.02, digits at 1.0
GRID = ("fashion_mnist:1.0", "fashion_mnist:0.1", "fashion_mnist:0.02", "digits:1.0")
DEFAULTS = {"seeds": "0,1,2"}
PRESET = "experiment=ssl_bench"
TINY = {"cells": ["digits:0.5"], "seeds": ["0"], "methods": ["fedce", "hybrid"]}
TINY_OVERRIDES = benchlib.as_overrides(
    {**benchlib.TINY_SIZES, "simulation.num_clients": 3, "fe.rounds": 2, "fe.patience": 0}
)
JOB_TIMEOUT_S = 3600
# bars of the issue (points as fractions)
PROBE_MARGIN, SSL_GLOBAL_MARGIN, HYBRID_MARGIN = 0.03, 0.02, 0.01


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=",".join(GRID), help="dataset:fraction, comma list")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default=DEFAULTS["seeds"])
    parser.add_argument("--overrides", default="", help="further Hydra overrides for every job")
    parser.add_argument(
        "--dataset-overrides",
        default=None,
        help="dataset:overrides;... e.g. 'fashion_mnist:dataset.subsample=3000' (default: "
        "Fashion-MNIST at the panel's sample size and CNN stride; '' for none)",
    )
    parser.add_argument("--skip-run", action="store_true", help="only re-analyse the run folder")
    parser.add_argument("--probe-only", action="store_true", help="stage 1 + probe, in-process")
    args = parser.parse_args()
    args.cells = [c for c in args.cells.split(",") if c]
    args.methods = args.methods.split(",")
    args.seeds = args.seeds.split(",")
    if args.tiny:
        args.cells, args.seeds = TINY["cells"], TINY["seeds"]
        args.methods = list(METHODS) if args.probe_only else TINY["methods"]  # in-process: cheap
    if args.dataset_overrides is None:
        args.per_dataset = panel_sizes()
        return args
    args.per_dataset = {}
    for part in filter(None, args.dataset_overrides.split(";")):
        dataset, _, text = part.partition(":")
        args.per_dataset[dataset] = benchlib.split_overrides(text)
    return args


def panel_sizes() -> dict[str, list[str]]:
    """The default per-dataset overrides: Fashion-MNIST at the panel preset's sample size and CNN
    stride (conf/experiment/panel_fashion_mnist.yaml holds them), the same for every method."""
    from nmoe.config import compose_config

    cfg = compose_config(["experiment=panel_fashion_mnist"])
    return {
        "fashion_mnist": [
            f"dataset.subsample={cfg.dataset.subsample}",
            f"model.cnn_stride={cfg.model.cnn_stride}",
        ]
    }


def cell_of(text: str) -> tuple[str, float]:
    dataset, _, fraction = text.partition(":")
    return dataset, float(fraction)


def jobs_of(args: Any) -> list[dict[str, Any]]:
    return [
        {"dataset": d, "fraction": f, "method": m, "seed": int(s)}
        for d, f in map(cell_of, args.cells)
        for m in args.methods
        for s in args.seeds
    ]


def job_dir(run_dir: Path, job: dict[str, Any]) -> Path:
    return run_dir / job["dataset"] / f"f{job['fraction']}" / job["method"] / f"seed{job['seed']}"


def run_job(job: dict[str, Any], run_dir: Path, args: Any) -> dict[str, Any]:
    """One `nmoe` run (kept if completed before, resumed from its checkpoint: a second call
    finishes an interrupted grid); returns wall seconds and exit status."""
    command = [
        str(benchlib.NMOE_CLI),
        PRESET,
        f"dataset={job['dataset']}",
        f"fe={job['method']}",
        f"dataset.label_fraction={job['fraction']}",
        f"seed={job['seed']}",
        f"output_dir={job_dir(run_dir, job)}",
        "log_level=quiet",
        *(TINY_OVERRIDES if args.tiny else []),
        *args.per_dataset.get(job["dataset"], []),
        *benchlib.split_overrides(args.overrides),
    ]
    label = f"ssl {job['dataset']} f={job['fraction']} {job['method']} seed {job['seed']}"
    return {**job, **benchlib.run_resumable(command, job_dir(run_dir, job), JOB_TIMEOUT_S, label)}


def probe_only_job(job: dict[str, Any], run_dir: Path, args: Any) -> dict[str, Any]:
    """Stage 1 by in-process FedAvg (what the ClientApp's `train.extractor` does on each client)
    and the probe of every round; writes results.json in the job folder in the run's shape."""
    import torch

    from nmoe.augment import ssl_augmentation
    from nmoe.config import compose_config, to_dict
    from nmoe.data import federation_spec, labelled, load_all_clients
    from nmoe.datasets import dataset_info
    from nmoe.models import build_bundle, stage1_keys
    from nmoe.probe import linear_probe
    from nmoe.ssl import round_lr
    from nmoe.training import forward_batched, train_extractor

    out = job_dir(run_dir, job)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        PRESET,
        f"dataset={job['dataset']}",
        f"fe={job['method']}",
        f"dataset.label_fraction={job['fraction']}",
        f"seed={job['seed']}",
        *(TINY_OVERRIDES if args.tiny else []),
        *args.per_dataset.get(job["dataset"], []),
        *benchlib.split_overrides(args.overrides),
    ]
    cfg = compose_config(overrides)
    torch.set_num_threads(max(1, int(cfg.torch_threads)))
    started = time.monotonic()
    n = int(cfg.simulation.num_clients)
    clients = load_all_clients(federation_spec(cfg), n)
    info = dataset_info(str(cfg.dataset.name))
    shape, classes, seed, fe = info.image_shape, info.num_classes, int(cfg.seed), cfg.fe
    augment = ssl_augmentation(
        info.name, shape, info.background, strength=float(fe.augment_strength),
        mean=info.mean, std=info.std,
    )  # fmt: skip
    pooled = [labelled(c) for c in clients]
    probe_x, probe_y = torch.cat([p[0] for p in pooled]), torch.cat([p[1] for p in pooled])
    gx, gy = clients[0].global_x, clients[0].global_y

    def probe(bundle: Any) -> float:
        feats = forward_batched(bundle.fe, probe_x)
        return linear_probe(feats, probe_y, forward_batched(bundle.fe, gx), gy)

    method = job["method"]
    global_bundle = build_bundle(cfg.model, shape, classes, seed)
    keys = stage1_keys(global_bundle, method)
    random_init = probe(global_bundle)
    rounds, history = int(fe.rounds), []
    for rnd in range(1, rounds + 1):
        lr = round_lr(float(fe.lr), rnd - 1, rounds) if fe.cosine_lr else float(fe.lr)
        states, weights, losses = [], [], []
        for pid, client in enumerate(clients):
            if method == "fedce":
                x, y = labelled(client)
                mask = torch.ones(len(y), dtype=torch.bool)
            else:
                x, y, mask = client.train_x, client.train_y, client.train_labelled
            local = build_bundle(cfg.model, shape, classes, seed)
            local.load_state_dict(global_bundle.state_dict())
            result = train_extractor(
                local, x, y, method=method, epochs=int(fe.local_epochs), lr=lr,
                momentum=float(fe.momentum), batch_size=int(fe.batch_size),
                seed=seed * 1_000_003 + pid * 7919 + rnd, labelled=mask,
                ssl_weight=float(fe.ssl_weight), mu=float(fe.mu),
                weight_decay=float(fe.weight_decay), grad_clip=float(fe.grad_clip),
                augment=None if method == "fedce" else augment,
            )  # fmt: skip
            states.append(local.state_dict())
            weights.append(len(x))
            losses.append(result.loss)
        total = sum(weights)
        averaged = {
            k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total for k in keys
        }
        global_bundle.load_state_dict({**global_bundle.state_dict(), **averaged})
        row = {"stage": STAGES[method], "round": rnd, "loss": sum(losses) / len(losses)}
        row["probe-acc"] = probe(global_bundle)
        history.append(row)
        print(f"[ssl] {job['dataset']} f={job['fraction']} {method} round {rnd}: {row}", flush=True)
    seconds = time.monotonic() - started
    results = {
        "status": "completed",
        "config": to_dict(cfg),
        "history": history,
        "accuracy": {},
        "extra": {
            "probe": {"random_init": random_init, STAGES[method]: history[-1]["probe-acc"]},
            "probe_only": True,
        },
        "wall_time_s": {STAGES[method]: round(seconds, 1)},
    }
    (out / "results.json").write_text(json.dumps(results))
    print(f"[ssl] probe-only {job}: {seconds:.0f}s", flush=True)
    return {**job, "seconds": round(seconds, 1), "exit": 0, "probe_only": True}


def load_job(run_dir: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    return benchlib.completed_results(job_dir(run_dir, job))


def row_of(job: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """One job's numbers: probes (final F, random init, per round) and nmoe's accuracies."""
    stage = STAGES[job["method"]]
    probe = results.get("extra", {}).get("probe", {})
    history = [h for h in results["history"] if h.get("stage") == stage]
    return {
        **job,
        "probe": probe.get(stage),
        "probe_random_init": probe.get("random_init"),
        "probe_protocol": probe.get("protocol"),
        "probe_per_round": [h.get("probe-acc") for h in history],
        "stage1_rounds": len(history),
        "nmoe_local": results["accuracy"].get("nmoe", {}).get("mean"),
        "nmoe_global": results.get("accuracy_global", {}).get("nmoe", {}).get("mean"),
        "probe_only": bool(results.get("extra", {}).get("probe_only")),
        "wall_time_s": results.get("wall_time_s", {}),
        "config": results["config"],
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """cell -> method -> mean/std over seeds of probe, nmoe local/global; random-init row."""
    table: dict[str, Any] = {}
    for row in rows:
        key = f"{row['dataset']}:{row['fraction']}"
        table.setdefault(key, {}).setdefault(row["method"], []).append(row)
    out: dict[str, Any] = {}
    for key, by_method in table.items():
        cell: dict[str, Any] = {}
        randoms = [r["probe_random_init"] for rs in by_method.values() for r in rs]
        randoms = [v for v in randoms if v is not None]
        cell["random_init"] = {"probe": mean_std(randoms) if randoms else None}
        for method, rs in by_method.items():
            entry = {"seeds": [r["seed"] for r in rs]}
            for metric in ("probe", "nmoe_local", "nmoe_global"):
                values = [r[metric] for r in rs if r[metric] is not None]
                entry[metric] = mean_std(values) if values else None
            cell[method] = entry
        out[key] = cell
    return out


def _mean(cell: dict[str, Any], method: str, metric: str) -> float | None:
    value = cell.get(method, {}).get(metric)
    return None if value is None else value[0]


def bars(table: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars, per cell where the numbers exist (None: not measured)."""
    out: dict[str, Any] = {}
    for key, cell in table.items():
        dataset, fraction = cell_of(key)
        checks: dict[str, Any] = {}
        random = cell["random_init"]["probe"]
        fedsc = _mean(cell, "fedsc", "probe")
        if random is not None and fedsc is not None:
            margin = PROBE_MARGIN if dataset == "fashion_mnist" else 0.0
            if dataset != "fashion_mnist" or fraction in (1.0, 0.1):
                checks["fedsc_probe_vs_random"] = {
                    "fedsc": fedsc,
                    "random_init": random[0],
                    "needed": random[0] + margin,
                    "met": fedsc > random[0] + margin - 1e-12,
                }
        ce_g, ce_l = _mean(cell, "fedce", "nmoe_global"), _mean(cell, "fedce", "nmoe_local")
        if fraction in (0.1, 0.02) and ce_g is not None:
            ssl = [m for m in SSL_METHODS if _mean(cell, m, "nmoe_global") is not None]
            if ssl:
                best = max(ssl, key=lambda m: _mean(cell, m, "nmoe_global"))
                g, loc = _mean(cell, best, "nmoe_global"), _mean(cell, best, "nmoe_local")
                checks["ssl_nmoe_vs_fedce"] = {
                    "best_ssl": best,
                    "global": g,
                    "fedce_global": ce_g,
                    "local": loc,
                    "fedce_local": ce_l,
                    "met": g >= ce_g + SSL_GLOBAL_MARGIN and loc >= ce_l,
                }
        hy_g, hy_l = _mean(cell, "hybrid", "nmoe_global"), _mean(cell, "hybrid", "nmoe_local")
        if fraction == 1.0 and ce_g is not None and hy_g is not None:
            checks["hybrid_vs_fedce"] = {
                "hybrid_global": hy_g,
                "fedce_global": ce_g,
                "hybrid_local": hy_l,
                "fedce_local": ce_l,
                "met": hy_g >= ce_g - HYBRID_MARGIN and hy_l >= ce_l - HYBRID_MARGIN,
            }
        out[key] = checks
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.3f}" if not std >= 5e-4 else f"{mean:.3f} ± {std:.3f}"  # one seed: no std


def markdown(table: dict[str, Any]) -> str:
    lines = [
        "| dataset | label fraction | stage 1 | probe of F | nmoe local | nmoe global |",
        "|---|---|---|---|---|---|",
    ]
    for key, cell in table.items():
        dataset, fraction = cell_of(key)
        rand = cell["random_init"]["probe"]
        lines.append(f"| {dataset} | {fraction} | random init | {_fmt(rand)} | - | - |")
        for method in METHODS:
            if method in cell:
                e = cell[method]
                lines.append(
                    f"| {dataset} | {fraction} | {method} | {_fmt(e['probe'])} | "
                    f"{_fmt(e['nmoe_local'])} | {_fmt(e['nmoe_global'])} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    started_machine = machine_info()
    runs_dir = args.out_dir / "runs" / NAME
    jobs = jobs_of(args)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    if not args.skip_run:
        run = probe_only_job if args.probe_only else run_job
        runs = [run(job, runs_dir, args) for job in jobs]  # one at a time (2-core machine)
    wall = time.monotonic() - started
    rows = []
    for job in jobs:
        results = load_job(runs_dir, job)
        if results is not None:
            rows.append(row_of(job, results))
    table = summarise(rows)
    md = markdown(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{NAME}.md").write_text(md)
    write_result(
        args.out_dir,
        NAME,
        {
            "config": {
                "cells": args.cells,
                "methods": args.methods,
                "seeds": args.seeds,
                "preset": PRESET,
                "overrides": args.overrides,
                "dataset_overrides": args.per_dataset,
                "tiny": args.tiny,
            },
            "wall_s": round(wall, 1),
            "jobs": runs,
            "rows": rows,
            "table": table,
            "bars": bars(table),
            "notes": [
                "probe: nmoe/probe.py (logistic regression on standardised features, to "
                "convergence) trained on the pooled labelled client training images, scored on "
                "the balanced global test set; random_init: the same seeded F untrained.",
                "bars: FedSC probe >= random init + 3 pt (Fashion-MNIST, fractions 1.0 and 0.1; "
                "digits: above); at 0.1 / 0.02 the best SSL stage 1's nmoe global >= FedCE's + 2 "
                "pt and local >= FedCE's; at 1.0 hybrid within 1 pt of FedCE on both.",
            ],
        },
        started_machine,
    )
    print(md)


if __name__ == "__main__":
    main()
