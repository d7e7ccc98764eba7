"""Fixtures shared by the control-service tests of this tier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.unit.control_helpers import RecordingAgent


@pytest.fixture
def agents() -> Iterator[Callable[..., RecordingAgent]]:
    """Starts RecordingAgents (`agents(node, target, **options)`) and stops them after the test."""
    started: list[RecordingAgent] = []

    def make(node: str, target: str, **kwargs: Any) -> RecordingAgent:
        agent = RecordingAgent(node, target, **kwargs).start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.close()
