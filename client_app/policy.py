"""The node's own policy: what its owner allows, from the node config only (never a message or a
run config). A run config chooses algorithms within these bounds; anything beyond them is
refused with an error reply.

Node config keys (`flower-supernode --node-config "..."`), defaults for a device (with `data-dir`)
and for a simulated node:
- `share-splits` (`test,global,inbox` / every split): splits whose features may leave the node;
  `gate` (the gate-training cache) and `train` only by the owner's opt-in on a device;
- `share-predictions` (`false` / `true`): routed predictions may go to the server;
- `min-feature-noise` (0), `min-local-first` (0): at least this noise std on every feature row
  sent, at least this local-first quantile;
- `require-sealing` (`true` / `false`): refuse peer payloads that are not sealed end to end;
- `max-rows` (100000): feature rows accepted in one message, all batches together;
- `max-epochs` (1000), `min-lr` (1e-6), `max-lr` (10): local training bounds, any stage;
- `max-pending` (16 / 256), `pending-ttl-s` (600): routed queries waiting for their combine;
- `max-threads` (0 = no cap): torch threads.

A node without `data-dir` holds a partition of the configured (public) dataset: a simulated
node, with permissive defaults; a node with `data-dir` holds its owner's data, with strict ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SPLITS = ("train", "gate", "test", "global", "inbox")
DEVICE_SPLITS = ("test", "global", "inbox")
SIMULATED_SPLITS = SPLITS


class PolicyError(ValueError):
    """A request or run config goes beyond what the node's owner allows."""


@dataclass(frozen=True)
class NodePolicy:
    share_splits: tuple[str, ...] = DEVICE_SPLITS
    share_predictions: bool = False
    min_feature_noise: float = 0.0
    min_local_first: float = 0.0
    require_sealing: bool = True
    max_rows: int = 100_000
    max_epochs: int = 1000
    min_lr: float = 1e-6
    max_lr: float = 10.0
    max_pending: int = 16
    pending_ttl_s: float = 600.0
    max_threads: int = 0

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodePolicy:
        """The policy of a node config: its keys over the defaults of its kind."""
        simulated = not node_config.get("data-dir")
        values: dict[str, Any] = {}
        if simulated:
            values.update(
                share_splits=SIMULATED_SPLITS,
                share_predictions=True,
                require_sealing=False,
                max_pending=256,
            )
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in node_config:
                continue
            raw = node_config[key]
            values[f.name] = _parse(key, raw, type(getattr(cls(), f.name)))
        policy = cls(**values)
        policy.check()
        return policy

    def check(self) -> None:
        unknown = sorted(set(self.share_splits) - set(SPLITS))
        if unknown:
            raise PolicyError(f"node config 'share-splits': unknown splits {unknown}")
        if not 0 <= self.min_local_first <= 1:
            raise PolicyError("node config 'min-local-first' must be in [0, 1]")
        for name in (
            "min_feature_noise",
            "max_rows",
            "max_epochs",
            "min_lr",
            "max_pending",
            "pending_ttl_s",
            "max_threads",
        ):
            if getattr(self, name) < 0:
                raise PolicyError(f"node config '{name.replace('_', '-')}' must be >= 0")
        if not 0 < self.min_lr <= self.max_lr:
            raise PolicyError("node config 'min-lr' / 'max-lr': need 0 < min-lr <= max-lr")

    # ---------------------------------------------------------------- run config
    def admit(self, cfg: Any) -> None:
        """Refuse a run config that asks for more than the node allows."""
        epochs = {
            "fe.local_epochs": cfg.fe.local_epochs,
            "expert.epochs": cfg.expert.epochs,
            "expert.shared_local_epochs": cfg.expert.shared_local_epochs,
            "gate.local_epochs": cfg.gate.local_epochs,
            "baseline.epochs": cfg.baseline.epochs,
            "baseline.fedavg_local_epochs": cfg.baseline.fedavg_local_epochs,
        }
        for key, value in epochs.items():
            if int(value) > self.max_epochs:
                raise PolicyError(
                    f"config key '{key}': {value} epochs exceed this node's "
                    f"max-epochs={self.max_epochs}"
                )
        for key in ("fe.lr", "expert.lr", "gate.lr", "baseline.fedavg_lr"):
            value = float(_select(cfg, key))
            if not self.min_lr <= value <= self.max_lr:
                raise PolicyError(
                    f"config key '{key}': {value} is outside this node's learning "
                    f"rates [{self.min_lr}, {self.max_lr}]"
                )
        if self.require_sealing and not cfg.seal_payloads:
            raise PolicyError(
                "config key 'seal_payloads': this node exchanges peer payloads "
                "sealed end to end only (node config require-sealing=true)"
            )
        if cfg.record_predictions and not self.share_predictions:
            raise PolicyError(
                "config key 'record_predictions': this node keeps its predictions "
                "(node config share-predictions=false)"
            )
        if self.max_threads and int(cfg.torch_threads) > self.max_threads:
            raise PolicyError(
                f"config key 'torch_threads': {cfg.torch_threads} exceeds this "
                f"node's max-threads={self.max_threads}"
            )

    # ---------------------------------------------------------------- requests
    def share(self, split: str) -> None:
        """Refuse to send features of a split the node keeps."""
        if split not in self.share_splits:
            raise PolicyError(
                f"split '{split}' does not leave this node (node config "
                f"share-splits={','.join(self.share_splits)})"
            )

    def rows(self, count: int) -> None:
        if count > self.max_rows:
            raise PolicyError(
                f"{count} feature rows in one message exceed this node's max-rows={self.max_rows}"
            )

    def feature_noise(self, configured: float) -> float:
        return max(float(configured), self.min_feature_noise)

    def local_first(self, configured: float) -> float:
        return max(float(configured), self.min_local_first)

    def threads(self, configured: int) -> int:
        """Torch threads: the configured count (0 = torch's default, every core) within the cap."""
        if not self.max_threads:
            return configured
        return min(configured, self.max_threads) if configured else self.max_threads


def _select(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _parse(key: str, raw: Any, kind: type) -> Any:
    try:
        if kind is tuple:
            return tuple(s.strip() for s in str(raw).split(",") if s.strip())
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("true", "false"):
                raise ValueError(text)
            return text == "true"
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise PolicyError(f"node config '{key}': cannot read {raw!r} as {kind.__name__}") from err
