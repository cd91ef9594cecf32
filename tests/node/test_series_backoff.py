"""Failed entries are tried again with exponential backoff and jitter (not every 5 minutes
in lock-step on every node); permanent failures stop after ``backoffLimit`` series."""

from __future__ import annotations

from agent.node import errors, reconciling

INTERVAL = 300.0


def entry(**fields: object) -> reconciling.Entry:
    return reconciling.parse_entry({"name": "app", "image": "reg.test/app:1", **fields})


def wake_after(failures: list[reconciling.Outcome], e: reconciling.Entry) -> float | None:
    """When the planner wants to look again after the last of ``failures`` (at time 0)."""
    plan = reconciling.plan({"app": e}, {}, {"app": failures[-1]}, set(), now=0.0,
                            failed_retry_interval=INTERVAL, hopeless=errors.HOPELESS_REASONS,
                            permanent=errors.PERMANENT_REASONS)
    assert plan.start == ()
    return plan.wake_in


def series(e: reconciling.Entry, reason: str, n: int, jitter: float = 1.0
           ) -> list[reconciling.Outcome]:
    out: list[reconciling.Outcome] = []
    for _ in range(n):
        new = reconciling.Outcome(e.key, False, reason, 0.0, jitter=jitter)
        out.append(new.after(out[-1] if out else None))
    return out


def test_temporary_failures_are_retried_ever_later_and_not_in_lock_step() -> None:
    e = entry()
    waits = [wake_after(series(e, "Unavailable", n), e) for n in range(1, 8)]
    assert waits == [300, 600, 1200, 2400, 4800, 4800, 4800]  # doubling, capped
    # Two nodes failing alike draw different jitters: their retries spread out.
    assert wake_after(series(e, "Unavailable", 1, jitter=0.85), e) == 255
    assert wake_after(series(e, "Unavailable", 1, jitter=1.15), e) == 345


def test_permanent_failures_stop_after_backoff_limit_series() -> None:
    e = entry(backoffLimit=2)
    for reason in ("NotFound", "Unauthorized", "Denied", "NoMatchingPlatform"):
        assert wake_after(series(e, reason, 2), e) == 600, reason
        assert wake_after(series(e, reason, 3), e) is None, reason
    assert wake_after(series(e, "InvalidReference", 1), e) is None  # never retried


def test_a_changed_entry_starts_counting_again() -> None:
    e = entry()
    failures = series(e, "Unavailable", 4)
    changed = entry(timeoutSeconds=60)
    fresh = reconciling.Outcome(changed.key, False, "Unavailable", 0.0).after(failures[-1])
    assert fresh.failures == 1
