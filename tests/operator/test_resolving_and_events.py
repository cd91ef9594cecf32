"""Resolve once per generation (and never cache nothing), unknown images fail at the
prefetch, retrying nodes are shown and hold their slot, node failures are aggregated into
few Events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent import config
from agent.operator import (
    digests,
    dispatching,
    events,
    index,
    prefetches,
    resolving,
    status,
)

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def prefetch(generation: int = 1, **spec: Any) -> prefetches.Prefetch:
    return prefetches.parse({"metadata": {"namespace": "ns", "name": "p", "uid": "u",
                                          "generation": generation},
                             "spec": {"images": ["reg.test/app:1"], **spec}})


def state() -> index.State:
    settings = config.OperatorSettings(resolve_digests=True)
    return index.State(settings=settings, namespace="ops", client=None)  # type: ignore[arg-type]


class Registry:
    """Stands in for :func:`resolving.resolve`: answers from a list, records the asks."""

    def __init__(self, *answers: resolving.Resolution) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def __call__(self, refs: Any, *_: Any) -> dict[str, resolving.Resolution]:
        self.asked += 1
        answer = self.answers.pop(0)
        return {str(r): answer for r in refs}


def test_a_tag_in_the_status_is_not_resolved_again_after_a_restart_or_an_edit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(resolving.Resolution(D2))  # the tag moved meanwhile
    monkeypatch.setattr(resolving, "resolve", registry)
    previous = {"observedGeneration": 1, "images": [
        {"image": "reg.test/app:1", "resolved": f"reg.test/app@{D1}", "digest": D1}]}
    # A restarted operator, and the next generation after an edit: IfNotPresent reuses it.
    for generation in (1, 2):
        memo = asyncio.run(digests.resolved_digests(state(), prefetch(generation), previous, {}))
        assert memo.digests == {"reg.test/app:1": D1}
    assert registry.asked == 0
    # Always: the same generation reuses it after a restart; a new one asks again.
    memo = asyncio.run(digests.resolved_digests(state(), prefetch(1, pullPolicy="Always"),
                                                previous, {}))
    assert memo.digests == {"reg.test/app:1": D1} and registry.asked == 0
    memo = asyncio.run(digests.resolved_digests(state(), prefetch(2, pullPolicy="Always"),
                                                previous, {}))
    assert memo.digests == {"reg.test/app:1": D2} and registry.asked == 1


def test_a_registry_blip_is_not_cached_as_no_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(resolving.Resolution(message="connection refused"),
                        resolving.Resolution(D1))
    monkeypatch.setattr(resolving, "resolve", registry)
    st = state()
    memo = asyncio.run(digests.resolved_digests(st, prefetch(), {}, {}))
    assert memo.digests == {} and memo.retry_at > 0
    memo.retry_at = 0  # the retry is due
    memo = asyncio.run(digests.resolved_digests(st, prefetch(), {}, {}))
    assert memo.digests == {"reg.test/app:1": D1} and registry.asked == 2
    asyncio.run(digests.resolved_digests(st, prefetch(), {}, {}))
    assert registry.asked == 2  # resolved: once per generation


IMAGE = status.ResolvedImage("reg.test/app:1", "app", "reg.test/app:1", "")
OTHER = status.ResolvedImage("reg.test/other:1", "other", "reg.test/other:1", "")


def aggregate(reports: dict[str, dispatching.NodeReport], images: list[status.ResolvedImage],
              problems: list[status.Problem] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return dict(status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=list(reports),
        dispatched=list(reports), reports=reports, images=images, previous={}, now="t",
        problems=problems))


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_an_image_the_registry_does_not_know_fails_the_prefetch_once() -> None:
    problem = status.Problem("ImageNotFound", "reg.test/app:1: the registry says it does not"
                             " exist (manifest unknown)", fatal=True, image="reg.test/app:1")
    pulling = dispatching.NodeReport("a", dispatching.PULLING, {"other": {
        "name": "other", "phase": "Downloading"}})
    st = aggregate({"a": pulling}, [IMAGE, OTHER], [problem])
    assert st["phase"] == "Failed" and "completionTime" not in st  # the other still pulls
    assert (condition(st, "Failed")["status"], condition(st, "Failed")["reason"]) == \
        ("True", "ImageNotFound")
    assert condition(st, "Complete")["status"] == "False"
    assert st["failures"][0] == {"node": "", "image": "reg.test/app:1",
                                 "reason": "ImageNotFound", "message": problem.message}
    done = dispatching.NodeReport("a", dispatching.READY, {"other": {
        "name": "other", "phase": "Ready"}})
    st = aggregate({"a": done}, [IMAGE, OTHER], [problem])
    assert st["phase"] == "Failed" and st["completionTime"]
    assert condition(st, "Ready")["status"] == "False"


def test_bad_input_makes_the_prefetch_degraded_with_the_reason() -> None:
    st = aggregate({}, [IMAGE], [status.Problem("NodeNotFound", "spec.nodeNames: 1 name(s)"
                                                " are not nodes: typo")])
    assert (condition(st, "Degraded")["status"], condition(st, "Degraded")["reason"]) == \
        ("True", "NodeNotFound")
    assert condition(st, "Progressing")["reason"] == "NoMatchingNodes"
    assert condition(aggregate({}, [IMAGE]), "Degraded")["status"] == "False"


def test_a_node_backing_off_shows_as_retrying_with_its_message() -> None:
    backing_off = dispatching.NodeReport("a", dispatching.PULLING, {"app": {
        "name": "app", "phase": "Pending", "reason": "Unavailable",
        "message": "attempt 1 of 4 failed: 503 Service Unavailable; retrying in 10s"}})
    st = aggregate({"a": backing_off}, [IMAGE])
    progressing = condition(st, "Progressing")
    assert progressing["reason"] == "Retrying"
    assert "a reg.test/app:1: Unavailable: attempt 1 of 4 failed" in progressing["message"]
    stopped = dispatching.NodeReport("a", dispatching.PULLING, {"app": {
        "name": "app", "phase": "Pending", "reason": "AgentStopped",
        "message": "the agent stopped; the pull resumes where it was when it restarts"}})
    assert condition(aggregate({"a": stopped}, [IMAGE]), "Progressing")["reason"] == "Pulling"


def test_a_failed_node_that_will_retry_holds_its_parallelism_slot() -> None:
    desired = {"app": {"name": "app", "image": "reg.test/app:1", "owners": [
        {"namespace": "ns", "name": "p", "uid": "u"}], "pullPolicy": "IfNotPresent",
        "backoffLimit": 3, "pinned": False}}
    failed = {"name": "app", "phase": "Failed", "reason": "Unavailable"}
    reports = {"a": dispatching.NodeReport("a", dispatching.FAILED, {
        "app": {**failed, "nextRetryTime": "2026-01-01T00:05:00Z"}})}  # type: ignore[dict-item]
    plan = dispatching.plan(["a", "b"], {"a": desired}, desired, reports, 1)  # type: ignore[arg-type]
    assert plan.dispatch == ()
    reports = {"a": dispatching.NodeReport("a", dispatching.FAILED, {"app": failed})}  # type: ignore[dict-item]
    plan = dispatching.plan(["a", "b"], {"a": desired}, desired, reports, 1)  # type: ignore[arg-type]
    assert plan.dispatch == ("b",)  # it gave up: the slot is free


def test_node_failures_become_one_event_per_reason_repeated_as_the_count_doubles() -> None:
    posted: list[str] = []

    def post(type_: str, reason: str, message: str) -> None:
        if type_ == "Warning":
            posted.append(f"{reason}: {message}")

    sent: set[str] = set()
    new = {"observedGeneration": 1, "nodes": {"desired": 300}}
    for count in range(1, 301):  # one more node fails at every reconcile
        reasons = {"NotFound": (count, {"node": "n0", "image": "reg.test/app:1",
                                        "reason": "NotFound", "message": "manifest unknown"})}
        events.emit_events(post, new, new, sent, (), reasons)  # type: ignore[arg-type]
    assert len(posted) == 9  # 1, 2, 4, ... 256 — not 300
    assert posted[-1] == ("PullFailed: 256 node(s) failed with NotFound; e.g. reg.test/app:1"
                          " on n0: manifest unknown")


def test_a_node_that_makes_no_progress_shows_as_stalling_before_it_is_cancelled() -> None:
    silent = dispatching.NodeReport("a", dispatching.PULLING, {"app": {
        "name": "app", "phase": "Downloading", "lastProgressTime": "2026-01-01T00:00:00Z",
        "stalls": 2, "bytesDone": 10, "bytesTotal": 100}})
    st = dict(status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=["a"], dispatched=["a"],
        reports={"a": silent}, images=[IMAGE], previous={}, now="2026-01-01T00:02:00Z"))
    progressing = condition(st, "Progressing")
    assert progressing["reason"] == "Stalling"
    assert "a reg.test/app:1: last progress at 2026-01-01T00:00:00Z (2 stall(s)" in \
        progressing["message"]
    st = dict(status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=["a"], dispatched=["a"],
        reports={"a": silent}, images=[IMAGE], previous={}, now="2026-01-01T00:00:30Z"))
    assert condition(st, "Progressing")["reason"] == "Pulling"
