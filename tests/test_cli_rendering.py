"""The ``prefetcher pull`` progress renderers: tty bars, plain lines, silent json."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from rich.console import Console

from agent.cli import rendering
from agent.images import descriptors, digests, mediatypes
from agent.images.progress import events, tracker

CHUNK = 64 * 1024
CONFIG = descriptors.Descriptor(mediatypes.OCI_CONFIG, digests.of(b"config"), 1_000)
LAYER1 = descriptors.Descriptor(mediatypes.OCI_LAYER_GZIP, digests.of(b"layer1"), 40 * CHUNK)
LAYER2 = descriptors.Descriptor(mediatypes.OCI_LAYER_GZIP, digests.of(b"layer2"), 30 * CHUNK)


def pull_with_a_stall(on_event: Callable[[events.ProgressEvent], None]) -> None:
    """A pull of three blobs (one already present), a recovered stall, then a fatal one."""
    pull = tracker.PullProgress("registry.test/app:1", on_event, clock=lambda: 0.0)
    pull.set_phase(events.Phase.RESOLVING)
    pull.add_blobs([CONFIG, LAYER1, LAYER2])
    pull.blob_present(CONFIG)
    pull.set_phase(events.Phase.DOWNLOADING)
    with pull.request(LAYER1.digest):
        for _ in range(40):
            pull.bytes_read(LAYER1.digest, CHUNK)
    pull.blob_done(LAYER1.digest)
    with pull.request(LAYER2.digest):
        for _ in range(10):
            pull.bytes_read(LAYER2.digest, CHUNK)
    pull.retry(LAYER2.digest, 1, "no data for 1s", stalled=True)
    with pull.request(LAYER2.digest, offset=10 * CHUNK):
        pull.bytes_read(LAYER2.digest, CHUNK)
        pull.stalled(None, "no progress in 2s", fatal=True)


def test_plain_mode_writes_phase_blob_retry_and_stall_lines_but_not_chunks() -> None:
    stream = io.StringIO()
    renderer = rendering.make_renderer("plain", stream)
    assert isinstance(renderer, rendering.PlainRenderer)
    pull_with_a_stall(renderer)
    renderer.close()
    lines = stream.getvalue().splitlines()
    layer1, layer2, config = LAYER1.digest.short, LAYER2.digest.short, CONFIG.digest.short
    assert lines == [
        "registry.test/app:1: Resolving",
        f"{config}: already present",
        "registry.test/app:1: Downloading 3 blobs, 4.6 MB",
        f"{layer1}: done 2.6 MB",
        f"{layer2}: retry (stalled) 1: no data for 1s",
        "registry.test/app:1: stalled, cancelling the pull: no progress in 2s",
    ]
    assert renderer.last is not None
    assert renderer.last.stall_cancellations == 1


def test_plain_mode_prints_totals_at_most_once_per_interval() -> None:
    now = [0.0]
    stream = io.StringIO()
    renderer = rendering.PlainRenderer(stream, interval=10, clock=lambda: now[0])
    pull = tracker.PullProgress("registry.test/app:1", renderer, clock=lambda: now[0])
    pull.add_blobs([LAYER1])
    with pull.request(LAYER1.digest):
        for _ in range(40):
            now[0] += 1  # a chunk a second: 40 chunks, 40 s
            pull.bytes_read(LAYER1.digest, CHUNK)
    totals = [line for line in stream.getvalue().splitlines() if " / " in line]
    assert len(totals) == 4
    assert totals[0] == ("registry.test/app:1: 655.4 kB / 2.6 MB (25%), blobs 0/1, layers 0/1")


def test_tty_mode_renders_bars_with_retries_and_stalls() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=140, color_system=None)
    renderer = rendering.make_renderer("tty", stream, console=console)
    assert isinstance(renderer, rendering.TtyRenderer)
    pull_with_a_stall(renderer)
    renderer.close()
    renderer.close()
    out = stream.getvalue()
    assert LAYER1.digest.short in out
    assert LAYER2.digest.short in out
    assert "stalled" in out
    assert "retries 1" in out
    assert "stalled, cancelling the pull: no progress in 2s" in out
    assert "Stalled" in out  # the total bar shows the phase


def test_tty_mode_draws_nothing_before_the_first_event() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True)
    rendering.make_renderer("tty", stream, console=console).close()
    assert stream.getvalue() == ""


def test_json_mode_writes_nothing_during_the_pull() -> None:
    stream = io.StringIO()
    renderer = rendering.make_renderer("json", stream)
    pull_with_a_stall(renderer)
    renderer.close()
    assert stream.getvalue() == ""
    assert renderer.last is not None
    assert renderer.last.phase is events.Phase.STALLED


def test_auto_mode_is_plain_when_the_stream_is_not_a_terminal() -> None:
    assert isinstance(rendering.make_renderer("auto", io.StringIO()), rendering.PlainRenderer)


def test_auto_mode_is_tty_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    renderer = rendering.make_renderer("auto", Terminal())
    assert isinstance(renderer, rendering.TtyRenderer)
    renderer.close()


def test_an_unknown_mode_is_rejected_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="auto, tty, plain, json"):
        rendering.make_renderer("fancy", io.StringIO())
