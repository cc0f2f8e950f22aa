"""Byte accounting and message auditing around the Grid."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a RecordDict: array data and keys, serialised configs and metrics."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    total += sum(len(record.deflate()) for record in content.config_records.values())
    return total + sum(len(record.deflate()) for record in content.metric_records.values())


class CommLedger:
    """Bytes sent down (server -> clients) and up (clients -> server) per stage."""

    def __init__(self) -> None:
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})

    def add(self, stage: str, up: int = 0, down: int = 0) -> None:
        self.bytes[stage]["up"] += up
        self.bytes[stage]["down"] += down

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(v) for stage, v in self.bytes.items()}

    def load(self, saved: dict[str, dict[str, int]]) -> None:
        for stage, v in saved.items():
            self.add(stage, up=int(v["up"]), down=int(v["down"]))


def describe_message(message: Message, direction: str, stage: str) -> dict[str, Any]:
    """What crossed the grid: type, node, and every array key with shape and dtype."""
    row: dict[str, Any] = {
        "direction": direction,
        "stage": stage,
        "type": message.metadata.message_type,
        "node": message.metadata.dst_node_id
        if direction == "down"
        else message.metadata.src_node_id,
        "error": message.error.reason if message.has_error() else None,
        "arrays": {},
    }
    if message.has_content():
        for rname, record in message.content.array_records.items():
            for key, arr in record.items():
                row["arrays"][f"{rname}/{key}"] = {"shape": list(arr.shape), "dtype": arr.dtype}
    return row


class CountingGrid:
    """Wraps a Grid: every send_and_receive is counted in the ledger under the current stage
    and, when `audit_path` is set, described (keys, shapes, dtypes) in a JSON-lines file."""

    def __init__(
        self,
        grid: Grid,
        ledger: CommLedger,
        audit_path: str | Path | None = None,
        poll_interval_s: float = 0.02,
    ) -> None:
        self.grid = grid
        self.ledger = ledger
        self.stage = "setup"
        self.audit_path = Path(audit_path) if audit_path else None
        self.poll_interval_s = poll_interval_s

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Flower's `Grid.send_and_receive`, polling every `poll_interval_s` instead of the
        grid's fixed interval (0.1 s in simulation, 3 s against a SuperLink)."""
        messages = list(messages)
        down = sum(content_bytes(m.content) for m in messages)
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            pulled = list(self.grid.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(r.metadata.reply_to_message_id for r in pulled)
            if pending:
                time.sleep(self.poll_interval_s)
        up = sum(content_bytes(r.content) for r in replies if r.has_content())
        self.ledger.add(self.stage, up=up, down=down)
        if self.audit_path is not None:
            with self.audit_path.open("a") as handle:
                for m in messages:
                    handle.write(json.dumps(describe_message(m, "down", self.stage)) + "\n")
                for r in replies:
                    handle.write(json.dumps(describe_message(r, "up", self.stage)) + "\n")
        return replies
