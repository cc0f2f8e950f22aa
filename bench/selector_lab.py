"""Selector lab: can a learned per-row choice between a device's own expert and the shared model
beat KnowGate's, and how far could any such choice go?

    python bench/selector_lab.py --root /tmp/labs_real/runs/routing_lab \\
        --federations fashion_mnist/ring20/seed102,digits/ring20/seed103

Offline, on federations the routing lab already trained (`bench/routing_lab.py`; held-out seeds,
never the panel's). Rows that local-first keeps on the device are answered as KnowGate answers
them, and so are the rows where the own expert and the shared model (stage 1's F + head, the
shared slot of the default) agree. On the rows where they disagree, a small selector picks one
of the two. It is an MLP on seven per-row signals: the own expert's familiarity ratio, both
models' top probabilities, each one's probability of the other's class, and both entropies.

Two selectors, each trained with local rows weighted by every value of `--local-weights`
against foreign ones:
- `ceiling` learns on the evaluation rows themselves (local and global test splits) of half the
  devices and is scored on the other half, and the other way round. It reads labels of the very
  kind of rows it is scored on, which no device has: an upper bound for any selector on these
  signals, not a deployable rule.
- `federated` learns only on what devices hold: each device's gate split (the images its expert
  never saw) as its own expert sees them (local rows) and as each neighbour's expert sees them
  (foreign rows: the neighbour's familiarity ratio and logits, which KnowGate's wave 2 already
  returns). It is trained here in one process on every device's rows: the most FedAvg of it
  could reach.
Writes bench/results/selector_lab.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import base_parser, machine_info, write_result
from panel import PERSONAL  # the panel's personal baselines: the local bar is the best of them
from routing_lab import (
    KNOWGATE_DEFAULTS,
    Federation,
    lab_config,
    local_first_rows,
    rule_gate,
    run_scores,
    shortfall,
)
from routing_lab import bars as routing_bars

NAME = "selector_lab"
SPLITS = ("test", "global")


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the routing lab's run folder")
    parser.add_argument("--federations", required=True, help="dataset/setting/seedN, comma-sep.")
    parser.add_argument("--local-weights", default="0.5,1,2,4")
    parser.add_argument("--steps", type=int, default=400, help="full-batch Adam steps")
    parser.add_argument(
        "--with-prior",
        action="store_true",
        help="two more signals: the expert's label prior at each model's predicted class",
    )
    return parser.parse_args()


def signals(
    ratio: torch.Tensor,
    own_logits: torch.Tensor,
    shared_logits: torch.Tensor,
    log_prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 7) what a requester knows of a row: the own expert's familiarity ratio (log), both
    models' top probabilities, each one's probability of the other's class, both entropies
    (with `log_prior`, the expert's (C,) log label prior, two more columns: its value at each
    model's predicted class); and the two models' predicted classes."""
    own, shared = torch.softmax(own_logits, 1), torch.softmax(shared_logits, 1)
    p_own, c_own = own.max(1)
    p_shared, c_shared = shared.max(1)
    entropy = [-(p * p.clamp_min(1e-9).log()).sum(1) for p in (own, shared)]
    x = torch.stack(
        [
            ratio.clamp(1e-3, 1e3).log(),
            p_own,
            p_shared,
            own.gather(1, c_shared.view(-1, 1)).squeeze(1),
            shared.gather(1, c_own.view(-1, 1)).squeeze(1),
            *entropy,
        ],
        dim=1,
    )
    if log_prior is not None:
        x = torch.cat([x, log_prior[c_own].view(-1, 1), log_prior[c_shared].view(-1, 1)], dim=1)
    return x, c_own, c_shared


class Rows:
    """Signals of many rows with whether each model is right, and a training weight."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def add(
        self, x: torch.Tensor, own_right: torch.Tensor, shared_right: torch.Tensor, weight: float
    ) -> None:
        disagree = own_right ^ shared_right  # the rows where the choice matters for accuracy
        if bool(disagree.any()):
            n = len(own_right)  # each source counts once, whatever its size
            self.parts.append((x[disagree], own_right[disagree], weight / n))

    def fit(self, steps: int, seed: int = 0) -> torch.nn.Module:
        """An MLP giving the logit of 'the own expert is right' (standardised inputs)."""
        x = torch.cat([p[0] for p in self.parts])
        y = torch.cat([p[1] for p in self.parts]).float()
        w = torch.cat([torch.full((len(p[0]),), p[2]) for p in self.parts])
        torch.manual_seed(seed)
        mean, std = x.mean(0), x.std(0) + 1e-6
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            logits = net((x - mean) / std).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w)
            (loss * len(w) / w.sum()).backward()
            opt.step()
        return torch.nn.Sequential(_Standardise(mean, std), net).eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Lab:
    """One federation's tensors for the selectors: evaluation rows and gate-split rows."""

    def __init__(self, fed: Federation, with_prior: bool = False) -> None:
        from nmoe.losses import label_log_prior
        from nmoe.routing import familiarity, familiarity_radius, familiarity_ratios
        from nmoe.training import forward_batched

        q = float(KNOWGATE_DEFAULTS["know_quantile"])
        self.fed = fed
        priors = [
            label_log_prior(fed.data[i]["expert_y"], 10) if with_prior else None
            for i in range(fed.n)
        ]
        knowgate = rule_gate(KNOWGATE_DEFAULTS)
        self.eval: dict[tuple[int, str], dict[str, Any]] = {}
        for i in range(fed.n):
            for split in SPLITS:
                d = fed.data[i][split]
                own_logits = d["logits"][:, i]
                ratio = familiarity(d["feats"], fed.data[i]["expert_feats"], q)
                x, c_own, c_shared = signals(ratio, own_logits, d["fedavg"], priors[i])
                self.eval[(i, split)] = {
                    "x": x,
                    "y": d["y"],
                    "own": c_own,
                    "shared": c_shared,
                    "knowgate": knowgate(fed, i, split).argmax(1),
                    "local": local_first_rows(fed, i, split, KNOWGATE_DEFAULTS),
                }
        radius = [familiarity_radius(fed.data[j]["expert_feats"], q) for j in range(fed.n)]
        # gate split of device j as seen by expert i (j itself, then its neighbours)
        self.gate_rows: list[tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for j in range(fed.n):
            feats, y = fed.data[j]["gate_feats"], fed.data[j]["gate_y"]
            shared_logits = forward_batched(fed.head, feats)
            for i in [j, *(i for i in fed.neighbours[j] if i != j)]:
                ratio = familiarity_ratios(feats, fed.data[i]["expert_feats"], radius[i])
                own_logits = forward_batched(fed.experts[i], feats)
                x, c_own, c_shared = signals(ratio, own_logits, shared_logits, priors[i])
                self.gate_rows.append((i == j, x, c_own == y, c_shared == y))

    def answer(self, selector: torch.nn.Module | None, i: int, split: str) -> float:
        """Device i's accuracy on `split`: KnowGate, except that where the own expert and the
        shared model disagree off the local-first rows, the selector picks one of them."""
        e = self.eval[(i, split)]
        pred = e["knowgate"].clone()
        if selector is not None:
            with torch.no_grad():
                take_own = selector(e["x"]).squeeze(1) > 0
            choose = ~e["local"] & (e["own"] != e["shared"])
            pred[choose] = torch.where(take_own, e["own"], e["shared"])[choose]
        return float((pred == e["y"]).float().mean())

    def scores(self, selector_of: dict[int, torch.nn.Module | None]) -> dict[str, float]:
        """Mean over devices of each split's accuracy, device i answered by `selector_of[i]`."""
        return {
            split: float(
                np.mean([self.answer(selector_of[i], i, split) for i in range(self.fed.n)])
            )
            for split in SPLITS
        }

    def ceiling(self, local_weight: float, steps: int) -> dict[str, float]:
        halves = [list(range(0, self.fed.n, 2)), list(range(1, self.fed.n, 2))]
        selector_of: dict[int, torch.nn.Module | None] = {}
        for train, held in (halves, halves[::-1]):
            rows = Rows()
            for i in train:
                for split in SPLITS:
                    e = self.eval[(i, split)]
                    weight = local_weight if split == "test" else 1.0
                    rows.add(e["x"], e["own"] == e["y"], e["shared"] == e["y"], weight)
            selector = rows.fit(steps)
            selector_of.update({i: selector for i in held})
        return self.scores(selector_of)

    def federated(self, local_weight: float, steps: int) -> dict[str, float]:
        rows = Rows()
        for is_local, x, own_right, shared_right in self.gate_rows:
            rows.add(x, own_right, shared_right, local_weight if is_local else 1.0)
        selector = rows.fit(steps)
        return self.scores({i: selector for i in range(self.fed.n)})


def bars(run: dict[str, Any]) -> dict[str, Any]:
    """The panel's two accuracy bars for this federation (`routing_lab.bars`), from its own
    run's baselines, and which personal baseline sets the local one."""
    scores = run_scores(run)
    best = max((m for m in PERSONAL if m in scores), key=lambda m: scores[m]["test"])
    return {"best_personal": best, **routing_bars(scores)}


def main() -> None:
    import json

    args = parse_args()
    started = machine_info()
    weights = [float(w) for w in args.local_weights.split(",")]
    table: dict[str, Any] = {}
    totals: dict[str, float] = {}
    for name in args.federations.split(","):
        dataset, setting, seed_name = name.split("/")
        cfg, run_dir = lab_config(args.root, dataset, setting, seed_name.removeprefix("seed"))
        run = json.loads((run_dir / "results.json").read_text())
        lab = Lab(Federation(cfg, run_dir), args.with_prior)
        bar = bars(run)
        rows = {"knowgate": lab.scores(dict.fromkeys(range(lab.fed.n)))}
        for w in weights:
            rows[f"ceiling_w{w:g}"] = lab.ceiling(w, args.steps)
            rows[f"federated_w{w:g}"] = lab.federated(w, args.steps)
        for key, result in rows.items():
            result["shortfall"] = shortfall(result, bar)
            totals[key] = totals.get(key, 0.0) + result["shortfall"]
        table[name] = {"bars": bar, **rows}
        print(
            f"[selector] {name} bars {bar['test']:.3f}/{bar['global']:.3f}: "
            + ", ".join(f"{k} {v['test']:.3f}/{v['global']:.3f}" for k, v in rows.items()),
            flush=True,
        )
    totals = {k: round(v, 2) for k, v in totals.items()}
    print("summed shortfall (points):", totals)
    payload = {"with_prior": args.with_prior, "federations": table, "summed_shortfall": totals}
    write_result(args.out_dir, NAME + ("_with_prior" if args.with_prior else ""), payload, started)


if __name__ == "__main__":
    main()
