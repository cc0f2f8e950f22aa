"""Head lab: does a local head (`expert.local_head`) help KnowGate, judged by the routing bars?

    python bench/head_lab.py --runs bench/results/runs/routing_lab --federations \
        fashion_mnist/ring20/seed100,digits/path2/seed100 --proximal 1,2,4 --ratios 0.5,0.75

On federations the routing lab trained and saved (`bench/routing_lab.py`, held-out seeds), every
personal expert is re-trained offline from its H_0 with each `expert.proximal`, on the labelled
images minus each `--holdouts` fraction (the run's own split for its own fraction), and every
client's local head is re-trained from H_0 without the pull on all its labelled images, as
`client_app` trains them. Each (holdout, proximal, `gate.know_shared_ratio`) is scored with the
default KnowGate options twice: the own expert answering the rows local-first keeps, and the
local head answering them (`nmoe.pipeline.plan_query`). Gaps are (local - best personal,
global - `fedavg`), the best personal baseline being the best of `shared_fe_own_head`,
`local_only` and every own model scored on that federation; variants are ranked by the summed
shortfall against the two bars (1 point). Writes bench/results/head_lab.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from benchlib import base_parser, machine_info, split_overrides, write_result
from expert_lab import BAR, retrained, shortfall
from panel import SETTINGS, preset
from routing_lab import KNOWGATE_DEFAULTS, LAB_OVERRIDES, Federation, rule_gate, rule_own, score

NAME = "head_lab"


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the routing lab's run folder")
    parser.add_argument("--federations", required=True, help="dataset/setting/seedN, comma-sep.")
    parser.add_argument("--proximal", default="1")
    parser.add_argument("--ratios", default="0.5", help="gate.know_shared_ratio values")
    parser.add_argument("--holdouts", default="0.4", help="the experts' gate holdout fractions")
    parser.add_argument("--overrides", default=LAB_OVERRIDES, help="as the lab trained them")
    parser.add_argument("--name", default=NAME, help="result file name")
    parser.add_argument(
        "--select",
        action="store_true",
        help="also: each client uses its head only where it validates better on its gate split",
    )
    return parser.parse_args()


def without_heads(fed: Federation) -> Federation:
    """`fed` with no local head (a federation trained with one has it in its saved state)."""
    new = copy.copy(fed)
    new.data = [
        {
            **entry,
            **{
                split: {k: v for k, v in entry[split].items() if k != "local_head"}
                for split in ("test", "global")
            },
        }
        for entry in fed.data
    ]
    return new


def with_heads(fed: Federation, heads: Federation, who: list[bool] | None = None) -> Federation:
    """`fed` whose clients (those `who` marks; all by default) answer their local-first rows
    with the own experts of `heads`."""
    new = without_heads(fed)
    for i, entry in enumerate(new.data):
        if who is None or who[i]:
            for split in ("test", "global"):
                entry[split]["local_head"] = heads.data[i][split]["logits"][:, i]
    return new


def heads_that_validate(
    fed_all: Federation, probes: Federation, experts: Federation, holdout: float
) -> list[bool]:
    """Per client: whether a plain head fine-tuned on its expert split (`probes`) beats its
    proximal expert on the images held out from both (the gate split): a choice each device
    could make on its own data. The gate split is the first `holdout` part of the permutation
    `nmoe.data.holdout_split` draws, i.e. of `fed_all`'s expert features (holdout 0)."""
    from nmoe.training import accuracy, forward_batched

    chosen = []
    for i, entry in enumerate(fed_all.data):
        held = int(len(entry["expert_y"]) * holdout)
        x, y = entry["expert_feats"][:held], entry["expert_y"][:held]
        own = [forward_batched(m.experts[i], x) for m in (probes, experts)]
        chosen.append(held > 0 and accuracy(own[0], y) > accuracy(own[1], y))
    return chosen


def federation(args: Any, name: str, holdout: float) -> tuple[Any, Federation]:
    """The saved federation `name` (dataset/setting/seedN) with its experts' split at `holdout`,
    without local heads."""
    from nmoe.config import compose_config

    dataset, setting, seed = name.split("/")
    run_dir = args.runs / name
    cfg = compose_config(
        [
            f"experiment={preset(dataset)}",
            *SETTINGS[setting],
            f"seed={seed.removeprefix('seed')}",
            f"output_dir={run_dir}",
            "state_key=lab",
            *split_overrides(args.overrides),
            f"expert.gate_holdout_fraction={holdout}",
        ]
    )
    return cfg, without_heads(Federation(cfg, run_dir))


def main() -> None:
    args = parse_args()
    started = machine_info()
    proximals = [float(p) for p in args.proximal.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    holdouts = [float(h) for h in args.holdouts.split(",")]
    gaps: dict[str, dict[str, list[float]]] = {}
    own: dict[str, dict[str, dict[str, float]]] = {}
    chosen_heads: dict[str, dict[str, list[bool]]] = {}
    for name in args.federations.split(","):
        run_dir = args.runs / name
        run = json.loads((run_dir / "results.json").read_text())
        cfg_all, fed_all = federation(args, name, 0.0)
        torch.manual_seed(0)
        heads = retrained(fed_all, run_dir, cfg_all, 0.0)  # H_0, no pull, every labelled image
        variants: dict[str, tuple[Federation, float]] = {}  # name -> (federation, shared ratio)
        models = {"local_head": heads}
        picks: dict[str, list[bool]] = {}
        for holdout in holdouts:
            cfg, fed = federation(args, name, holdout)
            for proximal in proximals:
                torch.manual_seed(0)
                experts = retrained(fed, run_dir, cfg, proximal)
                models[f"expert holdout {holdout} proximal {proximal}"] = experts
                chosen = None
                if args.select and holdout > 0:
                    torch.manual_seed(0)
                    probes = retrained(fed, run_dir, cfg, 0.0)
                    chosen = heads_that_validate(fed_all, probes, experts, holdout)
                    picks[f"holdout {holdout} proximal {proximal}"] = chosen
                for ratio in ratios:
                    key = f"holdout {holdout} proximal {proximal} ratio {ratio}"
                    variants[f"{key} own expert"] = (experts, ratio)
                    variants[f"{key} local head"] = (with_heads(experts, heads), ratio)
                    if chosen is not None:
                        variants[f"{key} local head where it validates"] = (
                            with_heads(experts, heads, chosen),
                            ratio,
                        )
        own[name] = {k: score(m, rule_own) for k, m in models.items()}
        chosen_heads[name] = picks
        best = max(
            [s["test"] for s in own[name].values()]
            + [run["accuracy"][m]["mean"] for m in ("shared_fe_own_head", "local_only")]
        )
        fedavg = run["accuracy_global"]["fedavg"]["mean"]
        for key, (fed, ratio) in variants.items():
            s = score(fed, rule_gate({**KNOWGATE_DEFAULTS, "know_shared_ratio": ratio}))
            gaps.setdefault(key, {})[name] = [
                round(s["test"] - best, 4),
                round(s["global"] - fedavg, 4),
            ]
        print(f"[head lab] {name}: scored {len(variants)} variants", flush=True)
    ranked = sorted(
        (
            {"variant": k, "shortfall": round(shortfall(list(v.values())), 4), "gaps": v}
            for k, v in gaps.items()
        ),
        key=lambda row: row["shortfall"],
    )
    payload = {
        "federations": args.federations.split(","),
        "bar": BAR,
        "knowgate_options": KNOWGATE_DEFAULTS,
        "ranked": ranked,
        "own_models": own,
        "clients_choosing_the_head": chosen_heads,
    }
    write_result(args.out_dir, args.name, payload, started)
    for row in ranked:
        print(f"{row['shortfall']:.4f}  {row['variant']}", flush=True)


if __name__ == "__main__":
    main()
