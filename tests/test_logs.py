"""Structured logs: JSON/text lines with trace and span ids, and the pull summary lines."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest
from fixtures import images
from fixtures.registries import Registry
from opentelemetry.sdk.trace import TracerProvider

from agent import logs
from agent.images import backends, descriptors, errors, service
from agent.images.progress import events
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY
from tests.kube.cluster import Cluster
from tests.kube.processes import PREFETCHER, Process

AMD64 = descriptors.Platform("linux", "amd64")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging set up into a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning)
    buffer = io.StringIO()
    yield buffer
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    sys.excepthook, threading.excepthook, sys.unraisablehook, warnings.showwarning = hooks


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


def test_kopf_object_records_name_the_object_and_not_kopfs_settings(
    stream: io.StringIO,
) -> None:
    import kopf

    logs.setup("info", "json", stream=stream)
    body = kopf.Body({"apiVersion": "prefetcher.dev/v1alpha1", "kind": "ImagePrefetch",
                      "metadata": {"name": "web", "namespace": "team", "uid": "u-1"}})
    kopf.ObjectLogger(body=body, settings=kopf.OperatorSettings()).info("Handler succeeded.")

    (line,) = lines(stream)
    assert line["message"] == "Handler succeeded." and line["logger"] == "kopf.objects"
    assert line["object"] == {"kind": "ImagePrefetch", "namespace": "team", "name": "web",
                              "uid": "u-1"}
    assert not {"settings", "k8s_ref", "k8s_skip"} & line.keys()


CRASHING = """
import logging, sys, threading, warnings
from agent import logs
logs.setup("info", sys.argv[1])
warnings.warn("deprecated knob")
logging.getLogger("agent.test").info("%d items", "not a number")
thread = threading.Thread(target=lambda: 1 / 0, name="worker")
thread.start(); thread.join()
class Leaky:
    def __del__(self):
        raise RuntimeError("in __del__")
Leaky()
raise ValueError("boom\\nsecond line")
"""


def test_in_json_uncaught_exceptions_warnings_and_bad_records_are_json_lines() -> None:
    out = subprocess.run([sys.executable, "-c", CRASHING, "json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    records = [json.loads(line) for line in out.stderr.splitlines()]
    by_message = {r["message"].split(":")[0]: r for r in records}
    assert len(records) == 5, out.stderr
    unformattable = next(r for r in records if "could not format" in r["message"])
    assert "%d items" in unformattable["message"] and "TypeError" in unformattable["exception"]
    warned = next(r for r in records if r["logger"] == "py.warnings")
    assert "deprecated knob" in warned["message"] and warned["level"] == "warning"
    thread = by_message["uncaught exception in thread worker"]
    assert thread["level"] == "error" and "ZeroDivisionError" in thread["exception"]
    ignored = next(r for r in records if "Leaky.__del__" in r["message"])
    assert "RuntimeError: in __del__" in ignored["exception"]
    crash = by_message["uncaught exception"]
    assert crash["level"] == "critical" and crash["logger"] == "agent.process"
    assert crash["exception"].startswith("Traceback (most recent call last):")
    assert crash["exception"].endswith("ValueError: boom\nsecond line")


def test_in_text_an_uncaught_exception_keeps_its_readable_traceback() -> None:
    out = subprocess.run([sys.executable, "-c", CRASHING, "text"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert " CRITICAL agent.process: uncaught exception: boom" in out.stderr
    assert "Traceback (most recent call last):" in out.stderr
    assert out.stderr.rstrip().endswith("ValueError: boom\nsecond line")


def test_operator_and_agent_write_only_json_lines_when_asked_tracebacks_included(
    tmp_path: Path,
) -> None:
    """The real processes, ``runtime.log_format = json``, against an API server answering
    NodeImageSet reads with an HTML error page: both fail their start-up handler with a
    traceback (kopf retries), and every line either wrote is one JSON object. The operator
    runs at ``log_level = warning``: none of kopf's info lines."""
    api = "prefetcher.dev/v1alpha1"
    with Cluster(tmp_path) as cluster:
        cluster.install_crds()
        cluster.put("v1", "namespaces", {"metadata": {"name": "prefetcher-system"}})
        cluster.add_node("node-a")
        assert cluster.api is not None
        cluster.api["get", kmock.resource(f"{api}/nodeimagesets")] << b"<html>502</html>"
        env = cluster.env() | {
            "PREFETCHER_RUNTIME__LOG_FORMAT": "json",
            "PREFETCHER_RUNTIME__HEALTH_ADDRESS": "",
            "PREFETCHER_RUNTIME__METRICS_ADDRESS": "",
            "PREFETCHER_OPERATOR__STANDALONE": "true",
            "PREFETCHER_RUNTIME__ROOT": str(tmp_path / "root"),
            # No container runtime here: the agent's own store (its default, auto, needs one).
            "PREFETCHER_IMAGES__SNAPSHOTTER": "overlayfs",
            "NODE_NAME": "node-a",
        }
        levels = {"operator": "warning", "agent": "info"}
        kube = ["--kubeconfig", str(cluster.kubeconfig_path)]
        processes = {
            command: Process([PREFETCHER, command, *kube], tmp_path / f"{command}.log",
                             env | {"PREFETCHER_RUNTIME__LOG_LEVEL": level})
            for command, level in levels.items()}
        try:
            for process in processes.values():
                process.start()
            for process in processes.values():
                process.wait_for_output("failed with an exception", timeout=30)
        finally:
            codes = [process.stop() for process in processes.values()]
    assert codes == [0, 0]
    records = {command: [json.loads(line) for line in process.output().splitlines()]
               for command, process in processes.items()}
    for lines_of in records.values():
        failed = [r for r in lines_of if "failed with an exception" in r["message"]]
        assert failed and failed[0]["level"] == "error", lines_of
        assert failed[0]["exception"].startswith("Traceback (most recent call last):")
        assert "JSONDecodeError" in failed[0]["exception"]
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in lines_of)
    assert {r["level"] for r in records["operator"]} <= {"warning", "error", "critical"}
    assert "info" in {r["level"] for r in records["agent"]}  # "agent starting"


@pytest.mark.parametrize(
    ("config_text", "env", "expected"),
    [
        ('[runtime]\nlog_format = "JSON"\nlog_level = "loud"\n', {}, "json"),
        ('[runtime]\nlog_format = "json"\n', {"PREFETCHER_RUNTIME__LOG_FORMAT": "text"}, "text"),
        ("[agent]\nlog_json = true\n", {}, "json"),  # a version 1 file
        ("not toml [", {"PREFETCHER_RUNTIME__LOG_FORMAT": "json"}, "json"),
        ("not toml [", {}, "text"),
    ],
)
def test_the_requested_format_is_read_even_from_invalid_settings(
    tmp_path: Path, config_text: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text)
    assert logs.requested_format(str(path), env) == expected


def test_invalid_settings_are_one_json_line_when_json_was_asked_for(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[runtime]\nlog_format = "json"\nlog_level = "loud"\n')
    env = {"PATH": "/usr/bin:/bin"}
    for command in ("operator", "agent"):
        out = subprocess.run([PREFETCHER, command, "--config", str(config)],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2
        (line,) = [json.loads(text) for text in out.stderr.splitlines()]
        assert line["level"] == "error" and line["logger"] == f"agent.cli.{command}"
        assert line["message"].startswith(f"prefetcher {command}: invalid configuration: "
                                          'runtime.log_level = "loud"')
    # Valid settings but no node: the agent says so in the format asked for.
    config.write_text('[runtime]\nlog_format = "json"\n')
    out = subprocess.run([PREFETCHER, "agent", "--config", str(config)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert json.loads(out.stderr)["message"].startswith("prefetcher agent: no node name")
    # Text stays the plain line it was.
    config.write_text('[runtime]\nlog_level = "loud"\n')
    out = subprocess.run([PREFETCHER, "operator", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.stderr.startswith("prefetcher operator: invalid configuration: ")
