"""StallWatchdog: containerd's pull progress reporter, with its fixes, on fake loop time."""

from __future__ import annotations

import asyncio

import pytest

from agent.images import digests, errors
from agent.images.progress import events, stall, tracker

DIGEST = digests.of(b"layer")


class Cancels:
    """The injected ``cancel``: records when and with what; ``wait()`` until called."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, errors.PullStalled]] = []
        self.called = asyncio.Event()

    def __call__(self, error: errors.PullStalled) -> None:
        self.calls.append((asyncio.get_running_loop().time(), error))
        self.called.set()

    async def wait(self) -> errors.PullStalled:
        await self.called.wait()
        return self.calls[0][1]


class Activity:
    """A fake of what the watchdog reads; records the loop time of each tick's read."""

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.ticks: list[float] = []
        self.stalls: list[tuple[digests.Digest | None, str, bool]] = []

    @property
    def active_requests(self) -> int:
        self.ticks.append(asyncio.get_running_loop().time())
        return self.active

    @property
    def total_bytes_read(self) -> int:
        return self.total

    def stalled(self, digest: digests.Digest | None, message: str, *, fatal: bool) -> None:
        self.stalls.append((digest, message, fatal))


@pytest.fixture
def seen() -> list[events.ProgressEvent]:
    return []


@pytest.fixture
def pull(seen: list[events.ProgressEvent]) -> tracker.PullProgress:
    return tracker.PullProgress("registry.test/app:1", seen.append)


@pytest.fixture
def cancel() -> Cancels:
    return Cancels()


async def drip(pull: tracker.PullProgress, every: float, n: int = 1) -> None:
    """Read ``n`` bytes every ``every`` seconds, forever, inside one active request."""
    with pull.request(DIGEST):
        while True:
            await asyncio.sleep(every)
            pull.bytes_read(DIGEST, n)


@pytest.mark.looptime
async def test_stuck_request_is_cancelled_after_exactly_the_timeout(
    looptime: float,
    pull: tracker.PullProgress,
    cancel: Cancels,
    seen: list[events.ProgressEvent],
) -> None:
    pull.request_started(DIGEST)
    pull.bytes_read(DIGEST, 1000)
    async with stall.StallWatchdog(pull, 300, cancel) as watchdog:
        error = await cancel.wait()
    assert looptime == 300
    assert isinstance(error, errors.PullStalled)
    assert str(error) == "no progress in 5m0s"
    assert watchdog.fired is error
    assert len(cancel.calls) == 1
    assert pull.stall_cancellations == 1
    assert pull.stalls == 0
    assert pull.phase is events.Phase.STALLED
    stalled = seen[-1]
    assert isinstance(stalled, events.Stalled)
    assert (stalled.digest, stalled.message, stalled.fatal) == (None, "no progress in 5m0s", True)


@pytest.mark.looptime
async def test_stuck_request_after_some_progress_is_cancelled_within_an_interval_past_the_timeout(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async def read_then_hang() -> None:
        pull.request_started(DIGEST)
        for _ in range(5):
            await asyncio.sleep(9.5)
            pull.bytes_read(DIGEST, 100)  # the last byte at 47.5

    async with stall.StallWatchdog(pull, 20, cancel) as watchdog:  # ticks every 10 s
        reader = asyncio.create_task(read_then_hang())
        await cancel.wait()
        await reader
    assert looptime == 70  # the tick at 50 saw the last byte; 20 s later
    assert 20 <= looptime - 47.5 <= 20 + watchdog.interval


@pytest.mark.looptime
async def test_progressing_request_is_not_cancelled(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async with stall.StallWatchdog(pull, 10, cancel):
        reader = asyncio.create_task(drip(pull, every=9.9))  # one byte just inside the timeout
        await asyncio.sleep(1_000)
        reader.cancel()
    assert looptime == 1_000
    assert cancel.calls == []
    assert pull.stall_cancellations == 0


@pytest.mark.looptime
async def test_request_that_reached_eof_but_commits_slowly_is_not_cancelled(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async with stall.StallWatchdog(pull, 2, cancel):
        with pull.request(DIGEST):
            await asyncio.sleep(1)
            pull.bytes_read(DIGEST, 4096)
        await asyncio.sleep(60)  # the slow fsync and commit under I/O pressure: 30 timeouts
        pull.blob_done(DIGEST)
    assert looptime == 61
    assert cancel.calls == []


@pytest.mark.looptime
async def test_request_starting_after_a_long_idle_period_gets_a_full_timeout(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async with stall.StallWatchdog(pull, 10, cancel):  # ticks every 5 s
        await asyncio.sleep(101)  # idle: a long unpack; the last idle tick is at 100
        pull.request_started(DIGEST)  # and it hangs
        await cancel.wait()
    # The first tick to see it (105) starts its clock; without that reset the tick at 105
    # would judge it by the idle tick at 100 and cancel it 4 s after it started.
    assert looptime == 115
    assert looptime - 101 >= 10


@pytest.mark.looptime
async def test_new_requests_alone_do_not_reset_the_clock_while_others_are_active(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async def retry_forever() -> None:
        while True:  # a pull stuck retrying: every request hangs up without a byte
            with pull.request(DIGEST):
                await asyncio.sleep(3)

    pull.request_started(None)  # another request that stays open
    async with stall.StallWatchdog(pull, 10, cancel):
        retrying = asyncio.create_task(retry_forever())
        await cancel.wait()
        retrying.cancel()
    assert looptime == 10


@pytest.mark.looptime
async def test_timeout_0_never_cancels(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    pull.request_started(DIGEST)
    watchdog = stall.StallWatchdog(pull, 0, cancel)
    assert not watchdog.enabled
    assert watchdog.interval == 0
    async with watchdog:
        assert watchdog._task is None
        await asyncio.sleep(1_000_000)
    assert looptime == 1_000_000
    assert cancel.calls == []
    assert pull.stall_cancellations == 0


@pytest.mark.parametrize(
    "timeout, interval",
    [(0.2, 0.1), (1, 0.5), (2, 1), (9, 4.5), (15, 7.5), (20, 10), (300, 10)],
)
def test_interval_is_half_the_timeout_up_to_10s_with_no_floor(
    timeout: float, interval: float
) -> None:
    assert stall.check_interval(timeout) == interval
    assert stall.StallWatchdog(Activity(), timeout, Cancels()).interval == interval


@pytest.mark.looptime
@pytest.mark.parametrize("timeout", [0.2, 2, 15])
async def test_short_timeout_ticks_every_half_timeout_with_no_floor(
    looptime: float, cancel: Cancels, timeout: float
) -> None:
    activity = Activity()
    async with stall.StallWatchdog(activity, timeout, cancel):
        await asyncio.sleep(timeout * 3 + timeout / 4)
    half = timeout / 2
    assert activity.ticks == pytest.approx(
        [0, half, 2 * half, 3 * half, 4 * half, 5 * half, 6 * half]
    )


@pytest.mark.looptime
async def test_long_timeout_ticks_every_10s(looptime: float, cancel: Cancels) -> None:
    activity = Activity()
    async with stall.StallWatchdog(activity, 300, cancel):
        await asyncio.sleep(35)
    assert activity.ticks == [0, 10, 20, 30]


@pytest.mark.looptime
@pytest.mark.parametrize(
    "timeout, message",
    [(2, "no progress in 2s"), (90, "no progress in 1m30s"), (300, "no progress in 5m0s")],
)
async def test_the_message_names_the_configured_timeout_go_style(
    looptime: float, cancel: Cancels, timeout: float, message: str
) -> None:
    activity = Activity()
    activity.active = 1
    async with stall.StallWatchdog(activity, timeout, cancel):
        error = await cancel.wait()
    assert str(error) == message
    assert error.reason == "PullStalled"
    assert activity.stalls == [(None, message, True)]


@pytest.mark.looptime
async def test_min_rate_catches_a_drip_that_the_byte_check_misses(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    # A byte a second resets the byte check forever...
    async with stall.StallWatchdog(pull, 10, cancel):
        reader = asyncio.create_task(drip(pull, every=1))
        await asyncio.sleep(200)
    assert cancel.calls == []
    reader.cancel()
    await asyncio.wait([reader])

    # ...but not a minimum rate of 100 bytes/s over the 10 s window.
    async with stall.StallWatchdog(pull, 10, cancel, min_bytes_per_second=100):
        reader = asyncio.create_task(drip(pull, every=1))
        error = await cancel.wait()
        reader.cancel()
    # The first tick sees the new request (205); a full window after it, the drip is caught.
    assert looptime == 200 + 5 + 10
    assert str(error).startswith("too little progress in 10s: ")
    assert "below the minimum of 100 bytes/s" in str(error)
    assert pull.stall_cancellations == 1


@pytest.mark.looptime
async def test_min_rate_does_not_fire_for_a_steady_stream_above_the_rate(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async with stall.StallWatchdog(pull, 10, cancel, min_bytes_per_second=100):
        reader = asyncio.create_task(drip(pull, every=1, n=101))
        await asyncio.sleep(200)
        reader.cancel()
    assert cancel.calls == []


@pytest.mark.looptime
async def test_min_rate_window_restarts_when_a_request_starts_after_idle(
    looptime: float, pull: tracker.PullProgress, cancel: Cancels
) -> None:
    async with stall.StallWatchdog(pull, 10, cancel, min_bytes_per_second=100):
        await asyncio.sleep(101)  # idle
        reader = asyncio.create_task(drip(pull, every=1))
        await cancel.wait()
        reader.cancel()
    assert looptime == 105 + 10  # a full window from the tick that saw it start


@pytest.mark.looptime
async def test_stopping_ends_the_ticks(looptime: float, cancel: Cancels) -> None:
    activity = Activity()
    watchdog = stall.StallWatchdog(activity, 2, cancel)
    watchdog.start()
    watchdog.start()  # idempotent
    await asyncio.sleep(2.5)
    await watchdog.stop()
    await watchdog.stop()
    ticks = len(activity.ticks)
    await asyncio.sleep(100)
    assert len(activity.ticks) == ticks == 3


@pytest.mark.looptime
async def test_an_error_in_cancel_surfaces_on_stop(looptime: float) -> None:
    def cancel(error: errors.PullStalled) -> None:
        raise RuntimeError("boom")

    activity = Activity()
    activity.active = 1
    watchdog = stall.StallWatchdog(activity, 2, cancel)
    watchdog.start()
    await asyncio.sleep(5)
    with pytest.raises(RuntimeError, match="boom"):
        await watchdog.stop()


def test_negative_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="stall timeout"):
        stall.StallWatchdog(Activity(), -1, Cancels())
    with pytest.raises(ValueError, match="min_bytes_per_second"):
        stall.StallWatchdog(Activity(), 1, Cancels(), min_bytes_per_second=-1)
