"""A pull cancelled because its entry changed (or went away) is not a failed pull in
``prefetcher_pulls_total``: admins alert on failures, and an edit is not one."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from agent import metrics
from agent.images import errors


def count(registry: CollectorRegistry, result: str, reason: str) -> float:
    return registry.get_sample_value("prefetcher_pulls_total",
                                     {"result": result, "reason": reason}) or 0.0


def test_a_cancelled_pull_counts_as_cancelled_and_a_stalled_one_as_failed() -> None:
    registry = CollectorRegistry()
    pulls = metrics.PullMetrics(registry)
    with pytest.raises(asyncio.CancelledError), pulls.recording("reg.test/app:1"):
        raise asyncio.CancelledError  # the supervisor cancelled the series: spec edited
    with pytest.raises(errors.PullStalled), pulls.recording("reg.test/app:1"):
        raise errors.PullStalled("no progress in 5m0s")
    assert count(registry, "failure", "Cancelled") == 0
    assert count(registry, "cancelled", "Cancelled") == 1
    assert count(registry, "failure", "PullStalled") == 1
