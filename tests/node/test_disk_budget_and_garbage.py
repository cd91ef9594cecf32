"""The disk budget a pull must fit, and which image records are garbage."""

from __future__ import annotations

from agent.images.progress import events
from agent.node import reconciling

GiB = 1024**3
MANAGED = {reconciling.LABEL_MANAGED: reconciling.MANAGED_BY}


def test_a_pull_that_would_cross_the_free_space_floor_does_not_fit() -> None:
    budget = reconciling.Budget(min_free_bytes=5 * GiB, min_free_percent=15)
    # 100 GiB disk: the floor is the stricter 15 GiB.
    assert budget.check(4 * GiB, capacity=100 * GiB, free=20 * GiB, store_size=0) is None
    problem = budget.check(6 * GiB, capacity=100 * GiB, free=20 * GiB, store_size=0)
    assert problem is not None and "floor of 15.0 GiB" in problem


def test_a_pull_that_would_outgrow_the_store_limit_does_not_fit() -> None:
    budget = reconciling.Budget(max_store_bytes=10 * GiB)
    assert budget.check(GiB, capacity=100 * GiB, free=90 * GiB, store_size=8 * GiB) is None
    problem = budget.check(3 * GiB, capacity=100 * GiB, free=90 * GiB, store_size=8 * GiB)
    assert problem is not None and "runtime.max_store_bytes" in problem


def test_the_expected_size_counts_only_what_is_still_to_download() -> None:
    snap = events.ProgressSnapshot(bytes_done=100, bytes_total=1100, bytes_unpacked=5000)
    assert reconciling.expected_bytes(snap) == 1000  # unpacked bytes are counted as written


def test_garbage_is_what_the_agent_pulled_and_nobody_wants_or_pins() -> None:
    records = [
        ("reg.test/a@sha256:1", MANAGED),
        ("reg.test/b@sha256:2", MANAGED),
        ("reg.test/pause:3.9", MANAGED),
        ("reg.test/cli-pulled:1", {}),
    ]
    assert reconciling.garbage(records, wanted=["reg.test/a@sha256:1"],
                               pinned=["reg.test/pause:3.9"]) == ["reg.test/b@sha256:2"]


def test_a_tag_in_pinned_images_keeps_the_image_the_agent_pulled_by_digest() -> None:
    pulled_by_digest = {**MANAGED, reconciling.LABEL_IMAGE: "reg.test/pause:3.9"}
    records = [("reg.test/pause@sha256:9", pulled_by_digest), ("reg.test/b@sha256:2", MANAGED)]
    assert reconciling.garbage(records, wanted=[],
                               pinned=["reg.test/pause:3.9"]) == ["reg.test/b@sha256:2"]


def test_a_status_item_counts_stalls_across_attempts() -> None:
    state = reconciling.ImageState("a")
    state.begin_attempt("t0")
    assert state.observe(events.ProgressSnapshot(phase=events.Phase.DOWNLOADING,
                                                 bytes_done=5, bytes_total=10), "t1")
    state.observe(events.ProgressSnapshot(phase=events.Phase.STALLED, stalls=2,
                                          stall_cancellations=1), "t2")
    assert state.phase == "Downloading"  # final phases belong to the series, not an attempt
    state.begin_attempt("t3")
    state.observe(events.ProgressSnapshot(phase=events.Phase.RESOLVING, stalls=1), "t4")
    status = state.to_status()
    assert (status["attempts"], status["stalls"], status["stallCancellations"]) == (2, 3, 1)
    assert status["lastProgressTime"] == "t1" and status["startTime"] == "t0"


def test_the_summary_counts_phases_for_kubectl() -> None:
    statuses = [{"phase": p} for p in ("Ready", "Ready", "Downloading", "Pending", "Failed")]
    assert reconciling.summary(statuses) == {"images": 5, "ready": 2, "pulling": 2, "failed": 1}
