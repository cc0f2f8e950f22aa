"""The gate registry: every module in this package that defines a `Gate` subclass with a name.

Adding a gate is one module here, one `conf/gate/<name>.yaml` and a test; every list of gate
names (config validation and schema, client dispatch, personal state, baselines, benchmarks)
comes from `GATES`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Gate, GateData, GateServer, Params

__all__ = ["GATES", "Gate", "GateData", "GateServer", "Params", "get", "names", "trainable"]


def _discover() -> dict[str, Gate]:
    found: dict[str, Gate] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Gate)
                and value.name
                and value.__module__ == module.__name__
            ):
                if value.name in found:
                    raise RuntimeError(f"two gates named '{value.name}'")
                found[value.name] = value()
    return found


GATES: dict[str, Gate] = _discover()


def get(name: str) -> Gate:
    """The gate called `name`; `ValueError` naming the known ones otherwise."""
    if name not in GATES:
        raise ValueError(f"unknown gate '{name}', allowed: {', '.join(GATES)}")
    return GATES[name]


def names(include_measurement: bool = False) -> tuple[str, ...]:
    """Gate names a run may configure (with `include_measurement`, also the oracle kind)."""
    return tuple(n for n, g in GATES.items() if include_measurement or not g.measurement_only)


def trainable() -> tuple[str, ...]:
    """Names of the gates trained in stage 3."""
    return tuple(n for n, g in GATES.items() if g.trainable)
