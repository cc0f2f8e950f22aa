"""Routing lab: routing rules compared offline on the experts of real trained federations.

    python bench/routing_lab.py --seeds 100,101 --settings dir0.1,path2  # tuning seeds, held out

For every (dataset, setting, seed): one simulation of the panel preset with the clients' state
saved to disk, then, in this process, every client's features and every expert's logits on
every client's local test split and the global test set, and each client's expert-training
features (what an expert owner may consult about its own data). Every rule is then scored on
these tensors (local and global accuracy, mean over clients), the same numbers the routed waves
would give. The panel's seeds (0-2) are not used here: rules are chosen on held-out seeds.
Writes bench/results/routing_lab.json.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import base_parser, machine_info, write_result
from panel import (
    BAR_GLOBAL_MARGIN,
    BAR_LOCAL_MARGIN,
    DATASET_SETTINGS,
    PERSONAL,
    SETTINGS,
    headroom_share,
    preset,
)

NAME = "routing_lab"
# what the rules need: F, experts, H_0 and the baselines they are compared with (no trained gate)
LAB_OVERRIDES = "gate=knowgate baselines=[fedavg,shared_fe_own_head,local_only,oracle_router]"


def parse_args() -> Any:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits")
    parser.add_argument("--settings", default="dir0.1,dir0.3,path2")
    parser.add_argument("--seeds", default="100,101")
    parser.add_argument("--overrides", default=LAB_OVERRIDES)
    parser.add_argument("--reuse", action="store_true", help="reuse saved runs in the run folder")
    parser.add_argument("--no-grid", action="store_true", help="score the named rules only")
    parser.add_argument(
        "--federations", default="", help="dataset/setting/seedN, comma-sep. (instead of the three)"
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------- one federation
def simulate(cfg: Any, run_dir: Path) -> None:
    """The panel job with every virtual node's personal state saved under run_dir/state."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client_app.app import app as project_client_app
    from server_app.app import make_server_app
    from server_app.cli import backend_config

    state_dir = str(run_dir / "state")

    class WithStateDir(ClientApp):
        def __init__(self) -> None:
            super().__init__()

        def __call__(self, message, context):  # type: ignore[override]
            context.node_config["state-dir"] = state_dir
            return project_client_app(message, context)

    run_simulation(
        server_app=make_server_app(cfg),
        client_app=WithStateDir(),
        num_supernodes=int(cfg.simulation.num_clients),
        backend_config=backend_config(cfg),
    )


class Federation:
    """Everything a routing rule may use, as tensors (see the module docstring)."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        from client_app.node import (
            LOCAL_HEAD_GROUP,
            OWN_HEAD_GROUP,
            held_experts,
            held_local_head,
        )
        from client_app.state import read_state_file
        from nmoe import topology
        from nmoe.config import to_dict
        from nmoe.data import (
            SEED_EXPERT_SPLIT,
            client_seed,
            federation_spec,
            holdout_split,
            labelled,
            load_all_clients,
        )
        from nmoe.models import build_bundle, load_numpy
        from nmoe.training import forward_batched

        self.n = n = int(cfg.simulation.num_clients)
        self.shared = n if cfg.expert.shared_expert else None
        self.num_experts = n + (1 if self.shared is not None else 0)
        clients = load_all_clients(federation_spec(cfg), n)
        shape = tuple(clients[0].train_x.shape[1:])
        states = [
            read_state_file(run_dir / "state" / str(cfg.state_key) / f"partition-{i}.safetensors")
            for i in range(n)
        ]
        bundle = build_bundle(cfg.model, shape, 10, int(cfg.seed))
        load_numpy(bundle, states[0]["model/fe"], strict=False)
        self.fe, self.head = bundle.fe, bundle.head
        # what each device holds, as the ClientApp builds it (the shared slot once: client 0's)
        held = [
            held_experts(cfg, 10, i, self.shared if i == 0 else None, states[i].__getitem__,
                         lambda: self.head)
            for i in range(n)
        ]  # fmt: skip
        experts = [held[i][i] for i in range(n)]
        # what answers a device's own local-first rows, where it is not the expert
        local_heads = [
            held_local_head(cfg, 10, s.get(LOCAL_HEAD_GROUP), lambda: self.head) for s in states
        ]
        own_heads = []
        for s in states:
            own_heads.append(copy.deepcopy(self.head) if OWN_HEAD_GROUP in s else None)
            if own_heads[-1] is not None:
                load_numpy(own_heads[-1], s[OWN_HEAD_GROUP])
        if self.shared is not None:
            experts.append(held[0][self.shared])
        self.neighbours = topology.neighbour_sets(cfg.topology, n, int(cfg.seed))
        self.holdout = float(cfg.expert.gate_holdout_fraction)
        self.config = to_dict(cfg)
        self.data: list[dict[str, Any]] = []
        for i, c in enumerate(clients):
            x, y = labelled(c)
            seed = client_seed(int(cfg.seed), i, SEED_EXPERT_SPLIT)
            (ex, ey), (gx, gy) = holdout_split(x, y, self.holdout, seed)
            entry: dict[str, Any] = {
                "train_feats": forward_batched(self.fe, c.train_x),
                "expert_feats": forward_batched(self.fe, ex),
                "expert_y": ey,
                "gate_feats": forward_batched(self.fe, gx),  # the split the paper's gates learn on
                "gate_y": gy,
            }
            for split, (sx, sy) in {
                "test": (c.test_x, c.test_y),
                "global": (c.global_x, c.global_y),
            }.items():
                feats = forward_batched(self.fe, sx)
                entry[split] = {
                    "feats": feats,
                    "y": sy,
                    "logits": torch.stack([forward_batched(e, feats) for e in experts], dim=1),
                    "fedavg": forward_batched(self.head, feats),
                }
                if local_heads[i] is not None:
                    entry[split]["local_head"] = forward_batched(local_heads[i], feats)
                if own_heads[i] is not None:  # the `shared_fe_own_head` baseline's head
                    entry[split]["own_head"] = forward_batched(own_heads[i], feats)
            reach = torch.zeros(self.num_experts, dtype=torch.bool)
            reach[self.neighbours[i]] = True
            if self.shared is not None:
                reach[self.shared] = True
            entry["reachable"] = reach
            self.data.append(entry)
        self.experts = experts
        # familiarity ratios and local-first rows by (client, split, options), for every rule
        self.ratio_cache: dict[tuple[Any, ...], torch.Tensor] = {}


Rule = Callable[[Federation, int, str], torch.Tensor]  # -> (B, C) probabilities


def score(fed: Federation, rule: Rule) -> dict[str, float]:
    out = {}
    for split in ("test", "global"):
        accs = []
        for i in range(fed.n):
            probs = rule(fed, i, split)
            accs.append(float((probs.argmax(dim=1) == fed.data[i][split]["y"]).float().mean()))
        out[split] = float(np.mean(accs))
    return out


# ---------------------------------------------------------------------------- rules
def probs_of(fed: Federation, i: int, split: str) -> torch.Tensor:
    return torch.softmax(fed.data[i][split]["logits"], dim=2)


def rule_fedavg(fed: Federation, i: int, split: str) -> torch.Tensor:
    return torch.softmax(fed.data[i][split]["fedavg"], dim=1)


def rule_shared(fed: Federation, i: int, split: str) -> torch.Tensor:
    return probs_of(fed, i, split)[:, fed.shared]


def rule_own(fed: Federation, i: int, split: str) -> torch.Tensor:
    return probs_of(fed, i, split)[:, i]


def rule_own_head_and_expert(fed: Federation, i: int, split: str) -> torch.Tensor:
    """The device's own model alone (`expert.own_model=head_and_expert`): the mean of the
    `shared_fe_own_head` baseline's head's probabilities and its own expert's, never routed."""
    from nmoe.models import mean_of_probabilities

    d = fed.data[i][split]
    return torch.softmax(mean_of_probabilities(d["own_head"], d["logits"][:, i]), dim=1)


def rule_oracle(fed: Federation, i: int, split: str) -> torch.Tensor:
    from nmoe.pipeline import oracle_weights

    d = fed.data[i][split]
    answered = (
        d["reachable"].expand(len(d["y"]), -1)
        if "reachable" in d
        else fed.data[i]["reachable"].expand(len(d["y"]), -1)
    )
    w = oracle_weights(d["logits"], answered, d["y"])
    return (w.unsqueeze(-1) * probs_of(fed, i, split)).sum(dim=1)


def rule_own_or_stage1_oracle(fed: Federation, i: int, split: str) -> torch.Tensor:
    """Per sample, the own expert where it is right, else stage 1's model: the ceiling of any
    local-first rule that chooses between the two."""
    d = fed.data[i][split]
    own, stage1 = rule_own(fed, i, split), rule_fedavg(fed, i, split)
    return torch.where((own.argmax(dim=1) == d["y"]).unsqueeze(1), own, stage1)


def rule_class_oracle(fed: Federation, i: int, split: str) -> torch.Tensor:
    """Per true class, the better of the own expert and stage 1's model on that class of the
    global test set: the ceiling of choosing between them by a perfectly known class."""
    g = fed.data[i]["global"]
    own_right = rule_own(fed, i, "global").argmax(dim=1) == g["y"]
    stage1_right = rule_fedavg(fed, i, "global").argmax(dim=1) == g["y"]
    better = torch.zeros(int(g["y"].max()) + 1, dtype=torch.bool)
    for c in g["y"].unique():
        rows = g["y"] == c
        better[c] = own_right[rows].float().mean() > stage1_right[rows].float().mean()
    y = fed.data[i][split]["y"]
    own, stage1 = rule_own(fed, i, split), rule_fedavg(fed, i, split)
    return torch.where(better[y].unsqueeze(1), own, stage1)


def rule_stage1_task_prior(fed: Federation, i: int, split: str) -> torch.Tensor:
    """Stage 1's model alone, moved to the label prior its task's rows estimate (as KnowGate's
    blend does with weight 1, on every row): what the estimate is worth without any expert. The
    panel's `fedavg_task_prior` baseline."""
    from nmoe.routing import move_to_task_prior, own_label_prior

    probs = rule_fedavg(fed, i, split)
    return move_to_task_prior(probs, own_label_prior(fed.data[i]["expert_y"], probs.shape[1]))


# ---------------------------------------------------------------------------- pooled-label ceilings
# Not deployable: each is fitted on every client's labelled images pooled in one place, with every
# expert's outputs on them (an expert never on its own training images). They measure how
# much of the oracle's headroom a combiner of these experts could close with labels no federated
# gate holds. The shared slot holds stage 1's model where the panel's gate puts it there.
POOLED_STEPS, POOLED_LR, POOLED_DECAYS, POOLED_VAL = 400, 0.02, (0.0, 1e-3, 1e-2, 1e-1), 0.25


def pooled_inputs(fed: Federation, feats: torch.Tensor, i: int | None = None) -> torch.Tensor:
    """(B, E, C) every expert's log-probabilities on `feats` (the shared slot as the panel's
    gate fills it); experts out of client i's reach at log(1/C)."""
    from nmoe.training import forward_batched

    logits = torch.stack([forward_batched(e, feats) for e in fed.experts], dim=1)
    if KNOWGATE_DEFAULTS.get("shared_model") == "stage1" and fed.shared is not None:
        logits[:, fed.shared] = forward_batched(fed.head, feats)
    logp = torch.log_softmax(logits, dim=2)
    if i is not None:
        logp[:, ~fed.data[i]["reachable"]] = -float(np.log(logp.shape[2]))
    return logp


def pooled_rows(fed: Federation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every labelled image of every client: features, labels, expert log-probabilities and
    reach (B, E). On a client's expert split its own expert (trained on those rows) counts as out
    of reach, so that no expert is scored on its own training images."""
    parts = []
    for i, d in enumerate(fed.data):
        own_out = d["reachable"].clone()
        own_out[i] = False
        for x, y, reach in ((d["gate_feats"], d["gate_y"], d["reachable"]),
                            (d["expert_feats"], d["expert_y"], own_out)):  # fmt: skip
            if len(y):
                logp = pooled_inputs(fed, x, i)
                logp[:, ~reach] = -float(np.log(logp.shape[2]))
                parts.append((x, y, logp, reach.expand(len(y), -1)))
    feats, y, logp, reach = (torch.cat([p[k] for p in parts]) for k in range(4))
    return feats, y, logp, reach


def fit_pooled(
    loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    make: Callable[[], torch.nn.Module],
    rows: int,
    seed: int,
) -> torch.nn.Module:
    """Adam on the full batch: weight decay and steps chosen on a held-out quarter of the rows
    (by the loss), then refitted on every row with that choice."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=g)
    val, fit = order[: int(POOLED_VAL * rows)], order[int(POOLED_VAL * rows) :]

    def train(index: torch.Tensor, decay: float, steps: int, watch: torch.Tensor | None):
        torch.manual_seed(seed)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=POOLED_LR, weight_decay=decay)
        best = (float("inf"), steps)
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss_of(model, index).backward()
            opt.step()
            if watch is not None and step % 10 == 0:
                with torch.no_grad():
                    best = min(best, (float(loss_of(model, watch)), step))
        return model, best

    choices = [(train(fit, d, POOLED_STEPS, val)[1], d) for d in POOLED_DECAYS]
    (_, steps), decay = min(choices)
    return train(torch.arange(rows), decay, steps, None)[0]


Combiners = tuple[dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]  # models, mean, std


def fit_combiners(
    feats: torch.Tensor, y: torch.Tensor, logp: torch.Tensor, reach: torch.Tensor
) -> Combiners:
    """The gate, the stacker and the head fitted on these labelled rows (`fit_pooled` each), and
    the feature normalisation they expect."""
    mean, std = feats.mean(dim=0), feats.std(dim=0) + 1e-6
    z = (feats - mean) / std
    dim, experts, classes = feats.shape[1], logp.shape[1], logp.shape[2]
    stack_in = torch.cat([z, logp.flatten(1)], dim=1)

    def gate_loss(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        scores = model(z[idx]).masked_fill(~reach[idx], -float("inf"))
        mix = torch.logsumexp(torch.log_softmax(scores, dim=1).unsqueeze(2) + logp[idx], dim=1)
        return -mix.gather(1, y[idx].view(-1, 1)).mean()

    def stack_loss(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(stack_in[idx]), y[idx])

    def head_loss(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(z[idx]), y[idx])

    models = {
        "gate": fit_pooled(gate_loss, lambda: torch.nn.Linear(dim, experts), len(y), 0),
        "stack": fit_pooled(
            stack_loss, lambda: torch.nn.Linear(stack_in.shape[1], classes), len(y), 0
        ),
        "head": fit_pooled(head_loss, lambda: torch.nn.Linear(dim, classes), len(y), 0),
    }
    return models, mean, std


def combiner_probs(
    kind: str, fitted: Combiners, feats: torch.Tensor, logp: torch.Tensor, reach: torch.Tensor
) -> torch.Tensor:
    """(B, C) the answer of the fitted combiner `kind` (gate, stack or head) on these rows."""
    models, mean, std = fitted
    z = (feats - mean) / std
    with torch.no_grad():
        if kind == "head":
            return torch.softmax(models[kind](z), dim=1)
        if kind == "stack":
            return torch.softmax(models[kind](torch.cat([z, logp.flatten(1)], dim=1)), dim=1)
        scores = models[kind](z).masked_fill(~reach, -float("inf"))
        return torch.exp(torch.logsumexp(torch.log_softmax(scores, 1).unsqueeze(2) + logp, 1))


def pooled_rule(kind: str) -> Rule:
    """Client i's answer by the combiner `kind` fitted on every client's labelled images."""

    def rule(fed: Federation, i: int, split: str) -> torch.Tensor:
        key = ("pooled",)
        if key not in fed.ratio_cache:
            fed.ratio_cache[key] = fit_combiners(*pooled_rows(fed))
        feats = fed.data[i][split]["feats"]
        reach = fed.data[i]["reachable"].expand(len(feats), -1)
        return combiner_probs(
            kind, fed.ratio_cache[key], feats, pooled_inputs(fed, feats, i), reach
        )

    return rule


# ---------------------------------------------------------------------------- CCVR (a direction)
# Classifier calibration with virtual representations (Luo et al., NeurIPS 2021): each client
# shares per-class counts, means and covariances of F's features on its labelled images; the
# server pools them into one Gaussian per class, samples a balanced set of virtual features and
# fine-tunes stage 1's head on them. The lab fits it offline, with fixed settings (not tuned).
CCVR_PER_CLASS, CCVR_STEPS, CCVR_LR = 300, 200, 0.01


def class_statistics(feats: torch.Tensor, y: torch.Tensor, classes: int) -> list[tuple]:
    """Per class: (count, mean, sum of outer products), what one client would share."""
    return [(int((y == c).sum()), feats[y == c].sum(0), feats[y == c].T @ feats[y == c])
            for c in range(classes)]  # fmt: skip


def ccvr_head(fed: Federation, seed: int = 0) -> torch.nn.Module:
    """Stage 1's head fine-tuned on virtual features drawn from the pooled class Gaussians."""
    import copy

    classes = fed.head.out_features
    stats = [
        class_statistics(torch.cat([d["expert_feats"], d["gate_feats"]]),
                         torch.cat([d["expert_y"], d["gate_y"]]), classes)
        for d in fed.data
    ]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        n = sum(s[c][0] for s in stats)
        if n < 2:
            continue
        mean = sum(s[c][1] for s in stats) / n
        cov = sum(s[c][2] for s in stats) / n - torch.outer(mean, mean)
        cov = cov * n / (n - 1) + 1e-4 * torch.eye(len(mean))
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        xs.append(dist.sample((CCVR_PER_CLASS,)))
        ys.append(torch.full((CCVR_PER_CLASS,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    head = copy.deepcopy(fed.head)
    opt = torch.optim.Adam(head.parameters(), lr=CCVR_LR)
    for _ in range(CCVR_STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head.eval()


def ccvr_view(fed: Federation) -> Any:
    """The federation with stage 1's head replaced by its CCVR-calibrated copy (in the shared
    slot, in local-first's class check, wherever the rules read `fedavg`)."""
    import copy

    key = ("ccvr_view",)
    if key not in fed.ratio_cache:
        head = ccvr_head(fed)
        view = copy.copy(fed)
        view.head, view.ratio_cache = head, {}
        view.data = []
        for d in fed.data:
            entry = dict(d)
            for split in ("test", "global"):
                with torch.no_grad():
                    entry[split] = {**d[split], "fedavg": head(d[split]["feats"])}
            view.data.append(entry)
        fed.ratio_cache[key] = view
    return fed.ratio_cache[key]


def on_ccvr(rule: Rule) -> Rule:
    """`rule` on the federation whose stage-1 head is CCVR-calibrated."""
    return lambda fed, i, split: rule(ccvr_view(fed), i, split)


def local_first_rows(fed: Federation, i: int, split: str, options: dict[str, Any]) -> torch.Tensor:
    """bool (B,): the rows device i answers alone under gate `options` (as `Node.local_rows`)."""
    from nmoe.routing import familiar, outside_own_classes

    d = fed.data[i][split]
    quantile = float(options["local_first_quantile"])
    confidence = float(options.get("local_first_class_confidence", 0.0))
    least = int(options.get("local_first_class_min", 3))
    key = ("local_first", i, split, quantile, confidence, least)
    if key not in fed.ratio_cache:  # the same rows for every rule with these options
        local = familiar(d["feats"], fed.data[i]["train_feats"], quantile)
        if confidence > 0:
            local &= ~outside_own_classes(d["fedavg"], fed.data[i]["expert_y"], confidence, least)
        fed.ratio_cache[key] = local
    return fed.ratio_cache[key]


def rule_gate(options: dict[str, Any]) -> Rule:
    """The gate `options["method"]` (one that asks familiarity, e.g. knowgate) as the ClientApp
    runs it: local-first, every reachable expert's familiarity with the sample, the gate's
    `reweight`, the mixture of the experts' probabilities."""
    from types import SimpleNamespace

    from nmoe import gates
    from nmoe.models import mean_of_probabilities
    from nmoe.pipeline import apply_prior_shift
    from nmoe.routing import combine, familiarity

    gate = gates.get(str(options["method"]))
    cfg = SimpleNamespace(**options)

    def ratios(fed: Federation, i: int, split: str) -> torch.Tensor:
        cache = fed.ratio_cache  # one cache for every rule scored on this federation
        key = (i, split, float(cfg.know_quantile))
        if key not in cache:
            feats = fed.data[i][split]["feats"]
            r = torch.full((len(feats), fed.num_experts), float("inf"))
            for j in fed.neighbours[i]:
                r[:, j] = familiarity(feats, fed.data[j]["expert_feats"], float(cfg.know_quantile))
            cache[key] = r
        return cache[key]

    def rule(fed: Federation, i: int, split: str) -> torch.Tensor:
        d = fed.data[i][split]
        answered = fed.data[i]["reachable"].expand(len(d["y"]), -1)
        logits = d["logits"]
        if options.get("shared_model") == "stage1":  # the shared slot: stage 1's F + head
            logits = logits.clone()
            logits[:, fed.shared] = d["fedavg"]
        weights = gate.reweight(ratios(fed, i, split), answered, i, fed.shared, int(cfg.k), cfg)
        if float(cfg.local_first_quantile) > 0:
            local = local_first_rows(fed, i, split, options)
            weights[local] = 0.0
            weights[local, i] = 1.0
        # the device's local head: as held, or the `shared_fe_own_head` baseline's head, the same
        # recipe as `expert.local_head_init=stage1`, for federations trained before that option
        head = d.get(str(options.get("local_head_source", "local_head")))
        if not options.get("local_head", True):
            head = None
        if head is not None and options.get("own_model") == "head_and_expert":  # `Node.own_model`
            head = mean_of_probabilities(head, d["logits"][:, i])
        if float(cfg.local_first_quantile) > 0 and head is not None:  # as `plan_query`
            logits = logits.clone()
            logits[local, i] = head[local]
        probs, _ = combine(weights, logits, answered, fallback=i)
        shift = gate.prior_shift(cfg, fed.data[i]["expert_y"], probs.shape[1], fed.shared)
        if shift is not None:  # as `finish_query`: the own share from the local head, else expert
            own_probs = torch.softmax(head if head is not None else logits[:, i], dim=1)
            probs = apply_prior_shift(
                probs, weights, logits, answered, shift, [len(probs)], own_probs
            )
        return probs

    return rule


def preset_options(preset_name: str = "panel_digits") -> dict[str, Any]:
    """The routing options the panel runs (the preset's gate and shared slot), read from the
    composed config: the lab's `knowgate` row is the default gate, whatever the yaml says."""
    from dataclasses import fields

    from nmoe.config import compose_config
    from nmoe.gates.knowgate import KnowGateOptions

    cfg = compose_config([f"experiment={preset_name}"])
    gate = cfg.gate
    keys = [f.name for f in fields(KnowGateOptions)] + [
        "k",
        "local_first_quantile",
        "local_first_class_confidence",
        "local_first_class_min",
    ]
    options = {key: gate[key] for key in keys}
    return {
        "method": str(gate.method),
        "shared_model": str(cfg.expert.shared_model),
        "own_model": str(cfg.expert.own_model),
        **options,
    }


KNOWGATE_DEFAULTS = preset_options()
# the default of 2026-11-26 (before proximal experts; the experts are the federation's own)
KNOWGATE_BEFORE = {
    **KNOWGATE_DEFAULTS,
    "know_shared_ratio": 0.25,
    "local_first_class_confidence": 0.0,
    "know_prior_weight": 0.0,
    "know_own_share": False,
    "own_model": "local_head",
}
# the knowgate grid searched on the lab's (held-out) seeds. A first search chose the defaults of
# 2026-11-25 (know_quantile 0.5/0.7/0.9, own_bias 1.0-2.0, k 1-3, temperature 0.1/0.3); a second
# asked whether H_0 should compete (know_shared_ratio); a third (2026-11-26) put stage 1's own
# model (F + head) in the shared slot and asked how strongly it competes against the own expert
# (know_shared_ratio 0.25-1.0, own_bias 1.5-3, temperature 0.15/0.3, k 2/3, local-first quantile
# 0.7/0.8, class confidence 0/0.5); a fourth (2026-11-27, eleventh session) asked the same of
# converged F (stage 1 with the panel's patience of 30) and whether the local head should answer
# local-first rows (local head on/off, shared ratio 0.25-1.0, own bias 1.5-3, local-first
# quantile 0.6-0.8, class confidence 0/0.5: the defaults stayed); a fifth (twelfth session) how
# much of a blend towards the device's own classes (know_prior_weight 0-0.7) and how strong a
# fixed pull (boost 1/2/4, i.e. know_prior_mix 1/2, 2/3, 4/5), with and without the local head.
# This one (thirteenth session) asks whether each task should estimate the mix (None) and how much
# of the blend then (know_prior_weight 0-1), with and without the local head
TWELFTH_PRIOR = {  # the twelfth session's blend (no own share then)
    "know_prior_weight": 0.5,
    "know_prior_mix": 2 / 3,
    "know_own_share": False,
    "own_model": "local_head",
}
GRID_BASE = {**KNOWGATE_DEFAULTS, "know_own_share": False, "own_model": "local_head"}  # earlier
KNOWGATE_GRID = {
    "local_head": [True, False],
    "know_prior_weight": [0.0, 0.3, 0.5, 0.7, 1.0],
    "know_prior_mix": [None, 2 / 3],
}

RULES: dict[str, Rule] = {
    "fedavg": rule_fedavg,
    "shared_expert": rule_shared,
    "own_expert": rule_own,
    "own_head_and_expert": rule_own_head_and_expert,
    "oracle": rule_oracle,
    "own_or_stage1_oracle": rule_own_or_stage1_oracle,
    "class_oracle": rule_class_oracle,
    "knowgate": rule_gate(KNOWGATE_DEFAULTS),
    "knowgate_before": rule_gate(KNOWGATE_BEFORE),
    # where the devices hold a local head (`expert.local_head`): their own expert answers instead
    "knowgate_without_local_head": rule_gate({**KNOWGATE_DEFAULTS, "local_head": False}),
    "knowgate_without_prior_shift": rule_gate(  # no wave-3 correction at all
        {**KNOWGATE_DEFAULTS, "know_prior_weight": 0.0, "know_own_share": False}
    ),
    "knowgate_fixed_prior": rule_gate({**KNOWGATE_DEFAULTS, **TWELFTH_PRIOR}),
    # the fifteenth session's question: each task's own share (`gate.know_own_share`), from a
    # local head fine-tuned from stage 1's head (`expert.local_head_init=stage1`; on federations
    # trained before it, the `shared_fe_own_head` baseline's head, the same recipe)
    "knowgate_without_own_share": rule_gate(
        {**KNOWGATE_DEFAULTS, "know_own_share": False, "own_model": "local_head"}
    ),
    "knowgate_own_head": rule_gate({**KNOWGATE_DEFAULTS, "local_head_source": "own_head"}),
    # the sixteenth session's question: the own rows and share answered by the head alone (the
    # fifteenth session's default) or by the mean of the head's and the expert's probabilities
    "knowgate_own_head_alone": rule_gate(
        {**KNOWGATE_DEFAULTS, "local_head_source": "own_head", "own_model": "local_head"}
    ),
    "stage1_task_prior": rule_stage1_task_prior,
    "pooled_label_gate": pooled_rule("gate"),
    "pooled_label_stack": pooled_rule("stack"),
    "pooled_label_head": pooled_rule("head"),
    "ccvr_head": on_ccvr(rule_fedavg),
    "ccvr_task_prior": on_ccvr(rule_stage1_task_prior),
    "knowgate_ccvr": on_ccvr(rule_gate(KNOWGATE_DEFAULTS)),
}


def run_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A run's results.json as `{method: {"test", "global"}}` mean accuracies."""
    return {
        m: {"test": results["accuracy"][m]["mean"], "global": results["accuracy_global"][m]["mean"]}
        for m in results["accuracy"]
    }


def bars(run: dict[str, dict[str, float]]) -> dict[str, float]:
    """The issue's two bars on one federation, as the panel reads them (`panel.bars`), from the
    run's `{method: {"test", "global"}}`: the best personal model and fedavg's global accuracy,
    each less its margin."""
    return {
        "test": max(run[m]["test"] for m in PERSONAL if m in run) - BAR_LOCAL_MARGIN,
        "global": run["fedavg"]["global"] - BAR_GLOBAL_MARGIN,
    }


def shortfall(scores: dict[str, float], bar: dict[str, float]) -> float:
    """Points below the two bars, summed (0 where both are met)."""
    return float(sum(100 * max(0.0, bar[s] - scores[s]) for s in ("test", "global")))


def changed(options: dict[str, Any]) -> str:
    """A grid option by what it changes from the lab's `knowgate` rule (the panel's gate)."""
    base = {"local_head": True, **KNOWGATE_DEFAULTS}
    diff = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if base.get(k) != v)
    return f"grid: {diff or 'as knowgate'}"  # not a named rule's key: each row is scored once


def ranking(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid option and the named rules, by summed shortfall over the lab's federations."""
    totals: dict[str, dict[str, Any]] = {}
    for seeds in table.values():
        for scores in seeds.values():
            bar = bars(scores["run"])
            named = [(name, scores[name]) for name in RULES] + [
                (changed(g["options"]), g) for g in scores["grid"]
            ]
            for key, s in named:
                row = totals.setdefault(key, {"rule": key, "shortfall": 0.0, "met": 0})
                row["shortfall"] += shortfall(s, bar)
                row["met"] += sum(s[k] >= bar[k] for k in ("test", "global"))
    return sorted(totals.values(), key=lambda row: row["shortfall"])


def headroom_shares(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per federation, the share of the oracle router's global headroom over fedavg (the run's
    own, `panel.headroom_share`) each named rule closes, where that headroom is at least
    HEADROOM_MIN."""
    out = {}
    for name, seeds in table.items():
        for seed, scores in seeds.items():
            fedavg, oracle = (scores["run"][m]["global"] for m in ("fedavg", "oracle_router"))
            shares = {r: headroom_share(scores[r]["global"], fedavg, oracle) for r in RULES}
            if None not in shares.values():  # the same headroom for every rule
                out[f"{name}/seed{seed}"] = shares
    return out


def grid(base: dict[str, Any], axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    combos = [dict(base)]
    for key, values in axes.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def lab_config(
    run_root: Path, dataset: str, setting: str, seed: str, overrides: str = LAB_OVERRIDES
) -> tuple[Any, Path]:
    """The composed config of one lab federation and its run folder under `run_root`."""
    from benchlib import split_overrides

    from nmoe.config import compose_config

    run_dir = run_root / dataset / setting / f"seed{seed}"
    cfg = compose_config(
        [
            f"experiment={preset(dataset)}",
            *SETTINGS[setting],
            f"seed={seed}",
            f"output_dir={run_dir}",
            "state_key=lab",
            "log_level=quiet",
            *split_overrides(overrides),
        ]
    )
    return cfg, run_dir


def main() -> None:
    args = parse_args()
    started = machine_info()
    run_root = args.out_dir / "runs" / NAME
    table: dict[str, Any] = {}
    named = (
        [tuple(f.split("/")) for f in args.federations.split(",")]
        if args.federations
        else [
            (d, s, f"seed{seed}")
            for d in args.datasets.split(",")
            for s in args.settings.split(",")
            if s in DATASET_SETTINGS[d]
            for seed in args.seeds.split(",")
        ]
    )
    for dataset, setting, seed_name in named:
        seed = seed_name.removeprefix("seed")
        cfg, run_dir = lab_config(run_root, dataset, setting, seed, args.overrides)
        torch.set_num_threads(max(1, int(cfg.torch_threads)))  # as the panel's jobs run
        if not (args.reuse and (run_dir / "results.json").is_file()):
            t0 = time.monotonic()
            simulate(cfg, run_dir)
            print(
                f"[lab] {dataset} {setting} seed {seed}: trained in {time.monotonic() - t0:.0f}s",
                flush=True,
            )
        fed = Federation(cfg, run_dir)
        scores = {name: score(fed, rule) for name, rule in RULES.items()}
        baselines = json.loads((run_dir / "results.json").read_text())
        scores["run"] = run_scores(baselines)
        scores["grid"] = [
            {"options": o, **score(fed, rule_gate(o))}
            for o in ([] if args.no_grid else grid(GRID_BASE, KNOWGATE_GRID))
        ]
        table.setdefault(f"{dataset}/{setting}", {})[seed] = scores
        print(
            f"[lab] {dataset} {setting} seed {seed}: "
            + ", ".join(f"{k} {scores[k]['test']:.3f}/{scores[k]['global']:.3f}" for k in RULES),
            flush=True,
        )
    ranked = ranking(table)
    for row in ranked[:10]:
        print(f"[lab] shortfall {row['shortfall']:.1f}, bars met {row['met']}: {row['rule']}")
    shares = headroom_shares(table)
    for rule in RULES:
        values = [v[rule] for v in shares.values()]
        if values:
            print(f"[lab] headroom closed, mean over {len(values)}: {np.mean(values):.0%} {rule}")
    payload = {"scores": table, "rules": list(RULES), "ranking": ranked, "headroom": shares}
    write_result(args.out_dir, NAME, payload, started)
    print(json.dumps(table, indent=1)[:2000])


if __name__ == "__main__":
    main()
