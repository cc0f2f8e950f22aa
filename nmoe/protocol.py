"""Names both apps agree on: message actions, record keys, query modes and splits."""

from __future__ import annotations

# stage-1 method -> `train.<action>` message type
FE_ACTION = {"fedce": "fe_ce", "fedsc": "fe_sc", "hybrid": "fe_hybrid"}
FE_METHOD = {action: method for method, action in FE_ACTION.items()}
CORR_KEY = "fedsc.corr"  # a client's projector correlation matrix, beside F in a stage-1 reply
GATES = ("rangate", "rollgate", "fedgate")
TRAINABLE_GATES = ("rollgate", "fedgate")
QUERY_MODES = ("infer", "cache")
SPLITS = ("train", "gate", "test", "global")
# per-split metrics of a `query.combine` reply, keyed `<name>.<i>` for the query's i-th split
SEGMENT_METRICS = (
    "num-examples",
    "accuracy",
    "degraded",
    "answered-locally",
    "route-counts",
    "predictions",
)
# `train.expert` config "expert-init": train the personal expert from scratch, from the installed
# shared expert, or not at all (install F and the baseline head only)
EXPERT_INITS = ("scratch", "shared", "none")


def sync_due(rnd: int, every: int) -> bool:
    """Whether a part synchronised every `every` rounds (0 = never) is averaged in round `rnd` (1-based)."""
    return every > 0 and rnd % every == 0
