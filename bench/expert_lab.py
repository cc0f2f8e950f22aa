"""Expert lab: how personal experts are trained, judged by the routing bars, offline.

    python bench/expert_lab.py --runs bench/results/runs/routing_lab --federations \
        fashion_mnist/dir0.1/seed100,fashion_mnist/path2/seed100 --proximal 0,0.5,1,2

On federations the routing lab trained and saved (`bench/routing_lab.py`, held-out seeds), every
personal expert is re-trained from the shared expert H_0 it was fine-tuned from, on the same
expert-training features, with `expert.proximal` = each value given (0: plain fine-tuning, as
`nmoe.training.train_classifier` does it in the ClientApp); every KnowGate option of the grid is
then scored with the new experts. Options are ranked by the summed shortfall against the two
routing bars (global >= `fedavg` - 1 point, local >= the best personal baseline - 1 point, with
`local_expert` being the re-trained own expert) over all federations. Writes
bench/results/expert_lab.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from benchlib import base_parser, machine_info, write_result
from panel import SETTINGS, preset
from routing_lab import (
    KNOWGATE_BEFORE,
    KNOWGATE_DEFAULTS,
    LAB_OVERRIDES,
    Federation,
    grid,
    rule_gate,
    rule_own,
    score,
)

NAME = "expert_lab"
# the grid of 2026-11-27: the shared slot's pull, the own bias, local-first and its class check
GRID = {
    "know_shared_ratio": [0.25, 0.5, 1.0],
    "know_own_bias": [3.0, 6.0, 12.0],
    "local_first_quantile": [0.7, 0.8, 0.9],
    "local_first_class_confidence": [0.0, 0.3, 0.5, 0.7],
}
BAR = 0.01


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the routing lab's run folder")
    parser.add_argument("--federations", required=True, help="dataset/setting/seedN, comma-sep.")
    parser.add_argument("--proximal", default="0,0.5,1,2")
    parser.add_argument("--overrides", default=LAB_OVERRIDES, help="as the lab trained them")
    return parser.parse_args()


def retrained(fed: Federation, run_dir: Path, cfg: Any, proximal: float) -> Federation:
    """`fed` with every personal expert re-trained from H_0 with this proximal weight."""
    from client_app.state import read_state_file
    from nmoe.models import build_expert, load_numpy
    from nmoe.training import forward_batched, train_classifier

    experts = []
    for i in range(fed.n):
        state = read_state_file(
            run_dir / "state" / str(cfg.state_key) / f"partition-{i}.safetensors"
        )
        expert = build_expert(cfg.model, 10, int(cfg.seed))
        load_numpy(expert, state["model/shared_expert"])
        train_classifier(
            expert,
            fed.data[i]["expert_feats"],
            fed.data[i]["expert_y"],
            epochs=int(cfg.expert.epochs),
            lr=float(cfg.expert.lr),
            batch_size=int(cfg.expert.batch_size),
            seed=i,
            proximal=proximal,
        )
        experts.append(expert)
    new = copy.copy(fed)
    new.experts = [*experts, *fed.experts[fed.n :]]  # the shared slot stays
    new.data = []
    for entry in fed.data:
        entry = dict(entry)
        for split in ("test", "global"):
            part = dict(entry[split])
            logits = part["logits"].clone()
            for j, expert in enumerate(experts):
                logits[:, j] = forward_batched(expert, part["feats"])
            part["logits"] = logits
            entry[split] = part
        new.data.append(entry)
    return new


def gaps(fed: Federation, run: dict[str, Any], options: dict[str, Any]) -> tuple[float, float]:
    """(local - best personal, global - fedavg) of KnowGate with `options` on `fed`."""
    own = score(fed, rule_own)["test"]
    best_personal = max(
        own, run["accuracy"]["shared_fe_own_head"]["mean"], run["accuracy"]["local_only"]["mean"]
    )
    s = score(fed, rule_gate(options))
    return s["test"] - best_personal, s["global"] - run["accuracy_global"]["fedavg"]["mean"]


def shortfall(pairs: list[tuple[float, float]]) -> float:
    return sum(max(0.0, -BAR - a) + max(0.0, -BAR - b) for a, b in pairs)


def main() -> None:
    from benchlib import split_overrides

    from nmoe.config import compose_config

    args = parse_args()
    started = machine_info()
    options = grid(KNOWGATE_DEFAULTS, GRID)
    table: dict[float, list[list[tuple[float, float]]]] = {}
    scores: dict[str, dict[float, dict[str, Any]]] = {}
    for name in args.federations.split(","):
        dataset, setting, seed = name.split("/")
        run_dir = args.runs / dataset / setting / seed
        cfg = compose_config(
            [
                f"experiment={preset(dataset)}",
                *SETTINGS[setting],
                f"seed={seed.removeprefix('seed')}",
                f"output_dir={run_dir}",
                "state_key=lab",
                *split_overrides(args.overrides),
            ]
        )
        fed = Federation(cfg, run_dir)
        run = json.loads((run_dir / "results.json").read_text())
        for proximal in (float(p) for p in args.proximal.split(",")):
            torch.manual_seed(0)
            new = retrained(fed, run_dir, cfg, proximal)
            table.setdefault(proximal, []).append([gaps(new, run, o) for o in options])
            scores.setdefault(name, {})[proximal] = {
                "own_expert": score(new, rule_own),
                "knowgate_default": score(new, rule_gate(KNOWGATE_DEFAULTS)),
                "knowgate_before": score(new, rule_gate(KNOWGATE_BEFORE)),
                "run": {
                    m: {
                        "test": run["accuracy"][m]["mean"],
                        "global": run["accuracy_global"][m]["mean"],
                    }
                    for m in ("fedavg", "shared_fe_own_head", "local_only")
                },
            }
            print(f"[expert lab] {name} proximal {proximal}: scored", flush=True)
    ranked = sorted(
        (
            (shortfall([fed[n] for fed in per_fed]), proximal, n)
            for proximal, per_fed in table.items()
            for n in range(len(options))
        ),
        key=lambda row: row[0],
    )
    rows = [
        {
            "shortfall": round(s, 4),
            "proximal": proximal,
            "options": {k: options[n][k] for k in GRID},
            "gaps": [[round(a, 4), round(b, 4)] for a, b in (fed[n] for fed in table[proximal])],
        }
        for s, proximal, n in ranked
    ]
    default = options.index(KNOWGATE_DEFAULTS) if KNOWGATE_DEFAULTS in options else None
    payload = {
        "federations": args.federations.split(","),
        "grid": GRID,
        "scores": scores,
        "ranked": rows,
        "default_options": {k: KNOWGATE_DEFAULTS[k] for k in GRID},
        "default_options_per_proximal": {
            p: [[round(a, 4), round(b, 4)] for a, b in (fed[default] for fed in table[p])]
            for p in table
        }
        if default is not None
        else {},
    }
    write_result(args.out_dir, NAME, payload, started)
    for row in rows[:10]:
        print(row, flush=True)


if __name__ == "__main__":
    main()
