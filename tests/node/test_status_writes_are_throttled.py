"""The status reporter: one write per interval while bytes move, at once on phase changes,
and nothing lost to conflicts or a missing object. On fake loop time (looptime)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.node import kubeapi, reporting


class Writes:
    """A fake ``patch_status``: records (loop time, document); can fail on demand."""

    def __init__(self) -> None:
        self.done: list[tuple[float, dict[str, Any]]] = []
        self.failures: list[Exception] = []

    async def __call__(self, doc: dict[str, Any]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.done.append((asyncio.get_running_loop().time(), doc))

    @property
    def times(self) -> list[float]:
        return [round(t, 3) for t, _ in self.done]


def image(phase: str, done: int) -> dict[str, Any]:
    return {"name": "a", "phase": phase, "bytesDone": done, "bytesTotal": 1000}


@pytest.fixture
async def running() -> AsyncIterator[tuple[reporting.StatusReporter, Writes]]:
    writes = Writes()
    reporter = reporting.StatusReporter(
        writes, interval=2.0,
        missing=lambda e: isinstance(e, kubeapi.APIError) and e.status == 404)
    task = asyncio.create_task(reporter.run())
    yield reporter, writes
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.looptime
async def test_bytes_moving_are_written_at_most_once_per_interval(
        running: tuple[reporting.StatusReporter, Writes]) -> None:
    reporter, writes = running
    reporter.set_image(image("Downloading", 0))  # a new entry: written at once
    for n in range(1, 101):  # 100 chunks over 10 seconds
        await asyncio.sleep(0.1)
        reporter.set_image(image("Downloading", n * 10))
    await asyncio.sleep(3)
    assert writes.times == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert writes.done[-1][1]["images"][0]["bytesDone"] == 1000


@pytest.mark.looptime
async def test_a_phase_change_is_written_at_once(
        running: tuple[reporting.StatusReporter, Writes]) -> None:
    reporter, writes = running
    reporter.set_image(image("Downloading", 0))
    await asyncio.sleep(0.5)
    reporter.set_image(image("Downloading", 10))
    await asyncio.sleep(0.2)
    reporter.set_image(image("Unpacking", 1000), urgent=True)
    await asyncio.sleep(0.01)
    assert writes.times == [0.0, 0.7]
    assert writes.done[-1][1]["images"][0]["phase"] == "Unpacking"
    assert writes.done[-1][1]["summary"]["pulling"] == 1


@pytest.mark.looptime
async def test_a_conflict_is_retried_with_the_newest_state(
        running: tuple[reporting.StatusReporter, Writes]) -> None:
    reporter, writes = running
    writes.failures.append(kubeapi.APIError(409, "Conflict", "the object has been modified"))
    reporter.set_image(image("Downloading", 0))
    await asyncio.sleep(0.1)
    reporter.set_image(image("Ready", 1000), urgent=True)
    await asyncio.sleep(5)
    assert len(writes.done) == 1
    assert writes.done[0][1]["images"][0]["phase"] == "Ready"
    assert reporter.failures == 1


@pytest.mark.looptime
async def test_nothing_is_written_until_the_object_exists(
        running: tuple[reporting.StatusReporter, Writes]) -> None:
    reporter, writes = running
    writes.failures.append(kubeapi.APIError(404, "NotFound", "not found"))
    reporter.set_heartbeat({"version": "0.1.0", "storeFreeBytes": 7})
    await asyncio.sleep(10)
    assert writes.done == [] and reporter.pending
    assert await reporter.flush()  # nothing to write to: shutdown does not wait for it
    reporter.object_exists()
    await asyncio.sleep(0.01)
    assert [d["agent"]["storeFreeBytes"] for _, d in writes.done] == [7]


@pytest.mark.looptime
async def test_dropped_entries_leave_the_status_and_order_follows_the_spec(
        running: tuple[reporting.StatusReporter, Writes]) -> None:
    reporter, writes = running
    for name in ("b", "a", "c"):
        reporter.set_image({"name": name, "phase": "Pending"})
    reporter.order(["a", "b", "c"])
    reporter.set_generation(7)
    reporter.drop_image("b")
    await asyncio.sleep(0.01)
    doc = writes.done[-1][1]
    assert [i["name"] for i in doc["images"]] == ["a", "c"]
    assert doc["observedGeneration"] == 7
    assert doc["summary"]["images"] == 2
