"""The per-request stall policy the registry client uses: read timeout and back-off."""

from __future__ import annotations

import pytest

from agent.images.progress import stall


@pytest.mark.parametrize(
    "stall_timeout, read_timeout",
    [(0, None), (0.5, 0.25), (2, 1), (30, 15), (120, 60), (300, 60), (3600, 60)],
)
def test_a_request_may_stay_silent_for_half_the_stall_timeout_up_to_a_minute(
    stall_timeout: float, read_timeout: float | None
) -> None:
    assert stall.request_read_timeout(stall_timeout) == read_timeout


def test_the_default_policy_matches_the_default_stall_timeout() -> None:
    policy = stall.RetryPolicy()
    assert policy.max_request_stalls == stall.DEFAULT_MAX_REQUEST_STALLS == 3
    assert policy.read_timeout == stall.request_read_timeout(stall.DEFAULT_STALL_TIMEOUT) == 60


def test_backoff_doubles_per_attempt_and_is_capped() -> None:
    policy = stall.RetryPolicy(base=0.5, cap=10, jitter=0.5)
    no_jitter = [policy.backoff(n, rand=lambda: 0.0) for n in range(1, 8)]
    assert no_jitter == [0.5, 1, 2, 4, 8, 10, 10]
    assert policy.backoff(10_000, rand=lambda: 0.0) == 10


def test_backoff_jitter_takes_off_at_most_its_fraction() -> None:
    policy = stall.RetryPolicy(base=1, cap=60, jitter=0.5)
    assert policy.backoff(3, rand=lambda: 0.999999) == pytest.approx(2, rel=1e-5)
    for _ in range(100):
        assert 2 <= policy.backoff(3) <= 4


def test_policy_for_a_short_stall_timeout_backs_off_within_the_slack() -> None:
    policy = stall.RetryPolicy.for_stall_timeout(2)
    assert policy.read_timeout == 1
    assert policy.cap == 0.5
    assert all(policy.backoff(n) <= 0.5 for n in range(1, 10))
    # read timeout + the longest back-off still leave time before the pull-level timeout.
    assert policy.read_timeout + policy.cap < 2


def test_policy_for_a_disabled_stall_timeout_has_no_read_timeout() -> None:
    policy = stall.RetryPolicy.for_stall_timeout(0, max_request_stalls=5)
    assert policy.read_timeout is None
    assert policy.max_request_stalls == 5
    assert policy.cap == stall.RetryPolicy().cap
