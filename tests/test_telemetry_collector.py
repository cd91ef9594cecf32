"""A collector that is down or slow neither slows nor fails a pull, and the CLI exits promptly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures import images
from fixtures.otlp import OtlpReceiver, closed_port
from fixtures.registries import Registry

from tests.test_telemetry_cli import env_for, prefetcher

#: Seconds a traced CLI pull may take beyond an untraced one: the shutdown flush deadline
#: (3 s) plus slack for a loaded machine. The collector's 10 s delay must not show.
SLACK = 6.0


@pytest.fixture
def slow_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(delay=10.0) as r:
        yield r


def timed_pull(
    registry: Registry, repo: str, root: Path, env: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    out = prefetcher("pull", f"{registry.host}/{repo}:1", "--root", str(root), "--json", env=env)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    return elapsed, json.loads(out.stdout)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_collector_that_is_down_does_not_slow_or_fail_a_pull(
    registry: Registry, tmp_path: Path, protocol: str
) -> None:
    repo = f"otel/down-{protocol.replace('/', '-')}"
    images.push(registry, repo, "1", images.Image([images.random_layer(400_000, seed=95)]))
    baseline, _ = timed_pull(registry, repo, tmp_path / "a", env_for(None))
    env = env_for(f"http://127.0.0.1:{closed_port()}", OTEL_EXPORTER_OTLP_PROTOCOL=protocol)

    traced, result = timed_pull(registry, repo, tmp_path / "b", env)

    assert result["bytes_downloaded"] > 400_000
    assert traced < baseline + SLACK, (traced, baseline)


def test_a_collector_that_hangs_does_not_slow_or_fail_a_pull(
    registry: Registry, slow_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    images.push(registry, "otel/slow", "1", images.Image([images.random_layer(400_000, seed=96)]))
    baseline, untraced = timed_pull(registry, "otel/slow", tmp_path / "a", env_for(None))

    traced, result = timed_pull(
        registry, "otel/slow", tmp_path / "b", env_for(slow_receiver.endpoint)
    )

    assert slow_receiver.requests >= 1  # the export was attempted, and hung
    assert result["bytes_downloaded"] == untraced["bytes_downloaded"]
    # The pull itself is not slowed (spans are queued, exported by a background thread)…
    assert result["seconds"] < untraced["seconds"] + 2.0
    # …and the process exits at the flush deadline, not after the collector's 10 s.
    assert traced < baseline + SLACK, (traced, baseline)
