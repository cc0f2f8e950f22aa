"""The FAB `flwr run .` builds from this repository: the apps and their config, not the committed
benchmark results, and well under Flower's size limit (a run is refused above it)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

REPO = Path(__file__).resolve().parent.parent


def test_the_fab_holds_the_apps_and_no_benchmark_results() -> None:
    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server_app/app.py", "client_app/app.py", "conf/config.yaml"} <= set(names)
    assert not [n for n in names if n.startswith("bench/results/")]
    assert len(fab) < FAB_MAX_SIZE / 2, len(fab)
