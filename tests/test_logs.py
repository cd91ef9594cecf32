"""Structured logs: JSON/text lines with trace and span ids, and the pull summary lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry
from opentelemetry.sdk.trace import TracerProvider

from agent import logs
from agent.images import backends, descriptors, errors, service
from agent.images.progress import events
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY

AMD64 = descriptors.Platform("linux", "amd64")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging set up into a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line]


def test_json_lines_carry_the_current_trace_and_span_ids(stream: io.StringIO) -> None:
    logs.setup("info", "json", stream=stream)
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("agent.test")

    log.info("outside")
    with tracer.start_as_current_span("work") as span:
        log.info("inside %s", "work", extra={"reference": "example.com/app:1", "bytes": 5})
    log.debug("not at info")

    outside, inside = lines(stream)
    ctx = span.get_span_context()
    assert "trace_id" not in outside and outside["message"] == "outside"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["message"] == "inside work"
    assert inside["level"] == "info" and inside["logger"] == "agent.test"
    assert inside["reference"] == "example.com/app:1" and inside["bytes"] == 5
    assert inside["time"].endswith("Z")


def test_text_lines_put_fields_and_ids_after_the_message(stream: io.StringIO) -> None:
    logs.setup("debug", "text", stream=stream)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("agent.test").warning("slow", extra={"why": "a b", "n": 3})
    line = stream.getvalue().strip()
    assert " WARNING agent.test: slow why=\"a b\" n=3 trace_id=" in line
    assert line.endswith(f"span_id={format(span.get_span_context().span_id, '016x')}")


def test_setup_twice_keeps_one_handler(stream: io.StringIO) -> None:
    logs.setup("info", "json", stream=stream)
    logs.setup("info", "json", stream=stream)
    logging.getLogger("agent.test").info("once")
    assert len(lines(stream)) == 1


async def test_a_pull_logs_one_start_and_one_summary_line(
    stream: io.StringIO, registry: Registry, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(120_000, seed=111)])
    images.push(registry, "logs/app", "1", image)
    ref = f"{registry.host}/logs/app:1"
    logs.setup("info", "json", stream=stream)

    async with client.RegistryClient(hosts.RegistryHosts(None), None, retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            result = await svc.pull(
                ref, platform=AMD64, on_event=logs.PullLogger(fields={"node": "node-a"})
            )
        finally:
            svc.close()

    started, finished = [r for r in lines(stream) if r["logger"] == "agent.pull"]
    assert started["message"] == "pull started"
    assert started["reference"] == ref and started["node"] == "node-a"
    assert finished["message"] == "pull finished" and finished["level"] == "info"
    assert finished["result"] == "success"
    assert finished["digest"] == str(result.digest)
    assert finished["bytes_downloaded"] == result.bytes_downloaded > 120_000
    assert finished["bytes_total"] >= result.bytes_downloaded
    assert 0 < finished["duration_seconds"] < 30
    assert finished["throughput_bytes_per_second"] == pytest.approx(
        result.bytes_downloaded / finished["duration_seconds"], rel=0.05
    )
    assert finished["stalls"] == 0 and finished["retries"] == 0
    assert finished["layers"] == 1 and finished["node"] == "node-a"


def test_a_stalled_pull_logs_a_failure_summary(stream: io.StringIO) -> None:
    logs.setup("info", "json", stream=stream)
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    logger = logs.PullLogger(reference="r:1", clock=lambda: next(clock))
    snap = events.ProgressSnapshot(reference="r:1", bytes_total=1000, layers_total=1)
    d = "sha256:" + "a" * 64
    logger(events.PhaseChanged(snapshot=snap, phase=events.Phase.RESOLVING))
    logger(events.BlobProgress(snapshot=snap, digest=d, done=400, total=1000))  # type: ignore[arg-type]
    stalled = events.ProgressSnapshot(
        reference="r:1", bytes_total=1000, stalls=2, retries=2, stall_cancellations=1
    )
    logger(events.Stalled(snapshot=stalled, digest=None, message="no progress in 2s", fatal=True))
    logger(events.PhaseChanged(snapshot=stalled, phase=events.Phase.FAILED, message="stalled"))
    logger.finish(errors.PullStalled("again"))  # already logged: nothing more

    started, failed = lines(stream)
    assert failed["message"] == "pull failed" and failed["level"] == "warning"
    assert failed["result"] == "stalled" and failed["error"] == "stalled"
    assert failed["bytes_downloaded"] == 400 and failed["stalls"] == 2
    assert failed["stall_cancellations"] == 1 and failed["duration_seconds"] == 4.0
    assert failed["throughput_bytes_per_second"] == 100
