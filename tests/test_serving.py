"""Answers for new inputs: images dropped into a device's inbox get the predictions the routed
evaluation gives for the same images and state, written in the device's outbox; no prediction
and no input reaches the server. Familiar inputs are answered on the device itself (nmoe-device),
the others by the federation (`mode=serve`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from client_app.device import DeviceService
from nmoe.inbox import read_outbox
from server_app.app import run_job

from .live import NUM_PARTITIONS, LiveNode, RelayGrid, live_fleet

STATE_KEY = "serving"
TRAIN = [
    "experiment=smoke",
    "fe.rounds=4",
    "partition=iid",
    "expert=with_shared",
    "expert.shared_rounds=2",
    # the device's own model on both paths: the mean of its local head's and its expert's answers
    "expert.init_from_shared=true",
    "expert.proximal=1.0",
    "expert.local_head=true",
    "expert.own_model=head_and_expert",
    "gate=knowgate",
    "gate.local_first_quantile=0.5",
    # the class check on both paths (device service and routed query): device 0 trained its
    # expert on 24-29 images of classes 1, 7, 8 and 9 (30-37 of the others): rows the head is
    # sure belong to those never stay on the device
    "gate.local_first_class_confidence=0.3",
    "gate.local_first_class_min=30",
    f"state_key={STATE_KEY}",
    "baselines=[]",
]
DEVICE = 0


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class AuditedGrid(RelayGrid):
    """Keeps every message that crosses the relay."""

    def __init__(self, nodes: dict[int, LiveNode]) -> None:
        super().__init__(nodes, self.keep)
        self.seen: list[tuple[Message, Message]] = []

    def keep(self, request: Message, reply: Message) -> Message:
        self.seen.append((request, reply))
        return reply


def run(
    tmp_path: Path, nodes: dict[int, LiveNode], name: str, overrides: list[str]
) -> dict[str, Any]:
    from nmoe.config import compose_config

    grid = AuditedGrid(nodes)
    cfg = compose_config([*TRAIN, f"output_dir={tmp_path / name}", *overrides])
    run_job(grid, cfg)
    results = json.loads((tmp_path / name / "results.json").read_text())
    results["_grid"] = grid
    return results


def raw_pixels(images: np.ndarray) -> np.ndarray:
    """Normalised digits back to their raw 0..16 pixels (the form a device's camera gives)."""
    from nmoe.datasets import dataset_info

    info = dataset_info("digits")
    raw = images * np.array(info.std)[:, None, None] + np.array(info.mean)[:, None, None]
    return np.rint(raw * info.pixel_max).astype(np.uint8)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, module_task_identity: None) -> dict[str, Any]:
    from nmoe.config import compose_config
    from nmoe.data import federation_spec, load_client_data

    tmp = tmp_path_factory.mktemp("serving")
    nodes = live_fleet(tmp, TRAIN)
    trained = run(tmp, nodes, "train", [])
    reference = run(tmp, nodes, "reference", ["mode=inference", "record_predictions=true"])
    # the device's local test images, as raw pixel files, land in its inbox
    data, _ = load_client_data(federation_spec(compose_config(TRAIN)), DEVICE, NUM_PARTITIONS)
    inbox = tmp / f"node{DEVICE}" / "inbox"
    inbox.mkdir(parents=True)
    for i, pixels in enumerate(raw_pixels(data.test_x.numpy())):
        np.save(inbox / f"img-{i:04d}.npy", pixels)
    node_config = dict(nodes[10 + DEVICE].context.node_config)
    service = DeviceService(node_config, STATE_KEY)
    local = service.step()
    serving = run(tmp, nodes, "serve", ["mode=serve", "serve.duration_s=1", "serve.interval_s=0.2"])
    return {
        "trained": trained,
        "reference": reference,
        "serving": serving,
        "local": local,
        "outbox": read_outbox(tmp / f"node{DEVICE}" / "outbox"),
        "count": len(data.test_y),
        "inbox": inbox,
        "service": service,
        "test_x": data.test_x,
    }


def test_every_inbox_image_is_answered_in_the_outbox(served) -> None:
    outbox = served["outbox"]
    assert len(outbox) == served["count"]
    assert served["local"]["device"] > 0 and served["local"]["federated"] > 0, served["local"]
    by = {entry["answered_by"] for entry in outbox.values()}
    assert by == {"device", "federation"}
    assert not list(served["inbox"].glob("*.npy")) and not list(
        (served["inbox"] / "federated").iterdir()
    )
    assert len(list((served["inbox"] / "done").iterdir())) == served["count"]
    assert (
        served["serving"]["extra"]["serving"]["answered"][str(DEVICE)]
        == served["local"]["federated"]
    )


def test_the_device_answers_its_own_rows_with_its_own_model(served) -> None:
    """The rows the device keeps are answered by the mean of its local head's and its expert's
    probabilities (`expert.own_model=head_and_expert`), as wave 1 answers them."""
    import torch

    node = served["service"].node
    feats = node.features(served["test_x"])
    with torch.no_grad():
        got = torch.softmax(served["service"].own_model(feats), dim=1)
        head, expert = (torch.softmax(m(feats), dim=1) for m in (node.local_head(), node.expert()))
    torch.testing.assert_close(got, (head + expert) / 2)
    assert (head - expert).abs().max() > 1e-2  # two different models


def test_outbox_predictions_equal_the_routed_evaluation(served) -> None:
    """The same images and state: the predictions the evaluation's routed query gives."""
    expected = served["reference"]["predictions"]["knowgate"]["test"][str(DEVICE)]
    got = [served["outbox"][f"img-{i:04d}.npy"]["prediction"] for i in range(served["count"])]
    assert got == expected


def test_no_prediction_or_input_reaches_the_server(served) -> None:
    """During serving: feature rows travel sealed, combine replies carry counts only."""
    for request, reply in served["serving"]["_grid"].seen:
        for message in (request, reply):
            if not message.has_content():
                continue
            for record in message.content.array_records.values():
                for array in record.values():
                    assert array.dtype == "uint8" and len(array.shape) == 1, message.metadata
            for record in message.content.metric_records.values():
                assert "predictions" not in record
        assert "predictions" not in served["serving"]


def test_a_bad_file_is_refused_alone_and_a_failed_query_gives_its_inputs_back(tmp_path) -> None:
    from nmoe.datasets import dataset_info
    from nmoe.inbox import Inbox

    info = dataset_info("digits")
    inbox = Inbox(tmp_path / "in", tmp_path / "out", info)
    good = np.zeros(info.image_shape, np.uint8)
    np.save(tmp_path / "in" / "a-good.npy", good)
    np.save(tmp_path / "in" / "b-float.npy", good.astype(np.float32))
    np.save(tmp_path / "in" / "c-bright.npy", good + 200)
    np.save(tmp_path / "in" / "d-shape.npy", np.zeros((3, 3), np.uint8))
    np.save(tmp_path / "in" / "e-just-landed.npy", good)
    assert inbox.claim("q0", limit=10) == []  # the device service's turn first
    landed = time.time() - 10
    for path in (tmp_path / "in").glob("[a-d]-*.npy"):
        os.utime(path, (landed, landed))
    claimed = inbox.claim("q1", limit=10)
    assert [i.path.name for i in claimed] == ["a-good.npy"]
    errors = read_outbox(tmp_path / "out")
    assert set(errors) == {"b-float.npy", "c-bright.npy", "d-shape.npy"}
    assert all("error" in e and "prediction" not in e for e in errors.values())
    assert len(list((tmp_path / "in" / "refused").iterdir())) == 3
    inbox.release("q1")  # the query failed: its input waits for the next one
    assert [i.path.name for i in inbox.federated()] == ["a-good.npy"]
    assert [i.path.name for i in inbox.claim("q2", limit=10)] == ["a-good.npy"]
