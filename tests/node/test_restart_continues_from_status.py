"""A restarted agent continues from the status its previous process wrote: no
``images: []``, no Ready → Pending, attempts keep counting, failures are not retried at once.

The supervisor runs with its real reporter, puller and reconcile loop; the image service is
a fake whose store already holds the image (as after a DaemonSet rollout: the node kept its
store), and the status writer records every document it is asked to write.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from agent import metrics
from agent.images import records, service
from agent.node import collecting, credentials, health, pulling, reporting, supervising

from .test_attempt_series import DIGEST, FakeCollector, FakeService

READY_REF = "reg.test/app@" + str(DIGEST)
FAILED_REF = "reg.test/missing:1"


class Collector(FakeCollector):
    def usage(self) -> collecting.StoreUsage:
        return collecting.StoreUsage(capacity=10**9, free=10**8)

    async def measure(self) -> None:
        return None

    async def collect(self, wanted: Any) -> list[str]:
        return []


def record(name: str) -> service.ImageStatus:
    return service.ImageStatus(records.ImageRecord(
        name=name, digest=DIGEST, media_type="", size=1000, manifest_digest=DIGEST,
        config_digest=DIGEST, platform="linux/amd64", chain_id="c", blobs=[str(DIGEST)] * 4,
    ), unpacked=True)


def body() -> dict[str, Any]:
    return {
        "metadata": {"name": "node-a", "uid": "nis-1", "generation": 7},
        "spec": {"images": [
            {"name": "app", "image": "reg.test/app:1", "digest": str(DIGEST),
             "owners": [{"namespace": "ns", "name": "p", "uid": "u"}]},
            {"name": "missing", "image": FAILED_REF,
             "owners": [{"namespace": "ns", "name": "p", "uid": "u"}]},
        ]},
        "status": {"observedGeneration": 7, "images": [
            {"name": "app", "image": READY_REF, "phase": "Ready", "digest": str(DIGEST),
             "attempts": 2, "bytesDone": 1000, "bytesTotal": 1000},
            {"name": "missing", "image": FAILED_REF, "phase": "Failed", "reason": "Unavailable",
             "message": "503", "attempts": 4},
        ]},
    }


@pytest.mark.looptime
async def test_a_restarted_agent_keeps_ready_images_ready_and_failures_backed_off() -> None:
    written: list[dict[str, Any]] = []

    async def write(doc: dict[str, Any]) -> None:
        written.append(copy.deepcopy(doc))

    async def no_secret(_: str) -> None:
        return None

    svc = FakeService(present=[record(READY_REF)])
    reporter = reporting.StatusReporter(write, interval=1.0)
    pool = credentials.RegistryPool(no_secret, lambda k: None, "ns")  # type: ignore[arg-type,return-value]
    collector = Collector()
    puller = pulling.Puller(svc, pool, reporter, collector, metrics.AgentMetrics(),  # type: ignore[arg-type]
                            lambda *e: None, pulling.PullOptions("node-a", 10.0, 300.0))
    supervisor = supervising.Supervisor(
        node="node-a", puller=puller, reporter=reporter, collector=collector,  # type: ignore[arg-type]
        pool=pool, probes=health.Health(), failed_retry_interval=300.0, gc_period=0)
    supervisor.observe("ADDED", body())
    await supervisor.start()
    await asyncio.sleep(5)
    await supervisor.stop()

    assert written, "nothing was written"
    for doc in written:
        phases = {i["name"]: i["phase"] for i in doc["images"]}
        assert phases.get("app") == "Ready", doc  # never [] and never Pending
        assert phases.get("missing") == "Failed", doc  # not retried at once
    last = {i["name"]: i for i in written[-1]["images"]}
    assert last["app"]["attempts"] == 2 and last["missing"]["attempts"] == 4
    assert svc.pulls == []  # nothing downloaded again
