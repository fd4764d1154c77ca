"""Fixtures: real nats-server processes (a single node, a 3-node JetStream cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import NatsNode, run_cluster, run_single


@pytest.fixture(scope="module")
def nats_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsNode]:
    """One JetStream-enabled node, shared by a module's tests."""
    with run_single(tmp_path_factory.mktemp("nats")) as node:
        yield node


@pytest.fixture
def own_nats_node(tmp_path: Path) -> Iterator[NatsNode]:
    """A node of the test's own, for tests that stop or kill it."""
    with run_single(tmp_path) as node:
        yield node


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NatsNode]]:
    """Three routed JetStream nodes with a meta leader, shared by a module's tests."""
    with run_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
def own_nats_cluster(tmp_path: Path) -> Iterator[list[NatsNode]]:
    """A cluster of the test's own, for tests that kill a node."""
    with run_cluster(tmp_path) as nodes:
        yield nodes
