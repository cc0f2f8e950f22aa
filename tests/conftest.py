"""Fixtures shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Flower checks that a Message is built inside a task; a test that builds messages outside a
# running app sets the identity flwr's own ClientApp runner sets, through the same properties.
TEST_TASK_IDENTITY = {"run_id": 1, "node_id": 0, "task_id": 1}


@contextmanager
def flower_task_identity() -> Iterator[None]:
    """Set flwr's TaskIdentity (run 1, node 0, task 1) and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved: dict[str, int | None] = {}
    for name, value in TEST_TASK_IDENTITY.items():
        try:
            saved[name] = getattr(TaskIdentity, name)
        except RuntimeError:  # the property raises while it is unset
            saved[name] = None
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages built outside a running app need the identity Flower sets for a task."""
    with flower_task_identity():
        yield


@pytest.fixture(scope="module")
def module_task_identity() -> Iterator[None]:
    """`task_identity` for module-scoped fixtures."""
    with flower_task_identity():
        yield
