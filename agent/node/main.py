"""``prefetcher agent``: settings → image service, API client, supervisor → kopf standalone.

:func:`run` wires the pieces and runs kopf for the one NodeImageSet named after the node;
it returns 0 after SIGTERM/SIGINT once pulls are cancelled and the final status is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import kopf

from agent import config, logs, metrics, runtimes, telemetry
from agent.images import errors as image_errors
from agent.images import service
from agent.images.registry import client as registry_client
from agent.images.registry import credentials as image_credentials
from agent.images.registry import hosts
from agent.kube import leases
from agent.node import (
    collecting,
    credentials,
    handlers,
    health,
    heartbeating,
    kubeapi,
    pulling,
    reconciling,
    reporting,
    supervising,
)

logger = logging.getLogger("agent.node")

COMPONENT = "prefetcher-agent"
#: Seconds one watch request lasts before kopf reconnects.
WATCH_TIMEOUT = 600
#: The heartbeat Lease's leaseDurationSeconds, in heartbeat intervals (kubelet: 40s / 10s).
LEASE_DURATION_FACTOR = 4


def run(settings: config.Settings, options: service.ServiceOptions, *,
        verbose: bool = False) -> int:
    """Run the agent for ``settings.runtime.node_name`` until stopped."""
    rt = settings.runtime
    logs.setup("debug" if verbose else rt.log_level, rt.log_format)
    if not verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    tel = telemetry.setup(COMPONENT, enabled=settings.tracing.enabled,
                          http_client_spans=settings.tracing.http_client_spans,
                          node_name=rt.node_name)
    try:
        connection = kubeapi.load_connection(rt.kubeconfig, rt.kube_context)

        @kopf.on.login()
        def login(**_: Any) -> kopf.ConnectionInfo:
            # Re-reads a token file: kopf calls this again after a 401 (a rotated token).
            info: kopf.ConnectionInfo = connection.to_kopf()
            return info

        asyncio.run(_main(settings, options, connection))
    except image_errors.InvalidConfiguration as e:
        logger.error(f"the agent cannot start: {e}", extra={"node": rt.node_name})
        print(f"prefetcher agent: {e}", file=sys.stderr)
        return 2
    finally:
        tel.shutdown()
    return 0


async def _main(settings: config.Settings, options: service.ServiceOptions,
                connection: kubeapi.Connection) -> None:
    rt, img, node = settings.runtime, settings.images, settings.node
    # First: without a runtime to put images into, nothing else is worth starting.
    runtime = await asyncio.to_thread(runtimes.open_runtime, settings, default="auto")
    backend = runtime.backend
    logger.info(f"images go to {backend.info.describe()}",
                extra={"node": rt.node_name, "runtime": backend.info.to_json(),
                       "hosts_dir": runtime.hosts_dir})
    if unpinned := runtimes.pinning_warning(backend.info):
        # Once, at start: the node's status says it too (status.agent.runtime.pinning).
        logger.warning(unpinned, extra={"node": rt.node_name})
    probes = health.Health()
    health_server = health.HealthServer(probes, rt.health_address)
    await health_server.start()
    agent_metrics = metrics.AgentMetrics()
    metrics_server = metrics.serve(rt.metrics_address, agent_metrics.registry)
    client = kubeapi.Client(connection)
    registry_hosts = hosts.RegistryHosts(runtime.hosts_dir,
                                         headers=dict(img.registry.headers),
                                         mirrors=img.registry.mirrors)

    def make_registry(keychain: image_credentials.Keychain) -> registry_client.RegistryClient:
        return registry_client.RegistryClient(registry_hosts, keychain)

    anonymous = make_registry(image_credentials.Keychain.empty())
    # (The service owns the backend from here: it closes it if it cannot start.)
    svc = await asyncio.to_thread(service.ImageService, Path(rt.root), anonymous, options,
                                  backend=backend)
    try:
        # `prefetcher images ls/rm/gc` on this store (in the pod, or on the node) open the
        # same runtime when they are not told otherwise.
        await asyncio.to_thread(runtimes.remember, Path(rt.root), backend.info)
        probes.store_open = True
        collector = collecting.Collector(
            svc, reconciling.Budget(int(rt.min_free_bytes), rt.min_free_percent,
                                    int(rt.max_store_bytes)),
            img.pinned_images)
        await collector.measure()
        agent_metrics.register_store(lambda: collector.stats)
        reporter = reporting.StatusReporter(
            lambda status: client.patch_status(rt.node_name, status),
            interval=node.status_interval,
            missing=lambda e: isinstance(e, kubeapi.APIError) and e.status == 404)
        pool = credentials.RegistryPool(
            lambda name: client.get(kubeapi.secret_path(rt.namespace, name)),
            make_registry, rt.namespace)
        supervisor: supervising.Supervisor

        def post_event(type_: str, reason: str, message: str) -> None:
            involved = {"apiVersion": "prefetcher.dev/v1alpha1", "kind": "NodeImageSet",
                        "name": rt.node_name, "uid": supervisor.uid}
            task = asyncio.create_task(client.post_event(
                involved, type=type_, reason=reason, message=message, component=COMPONENT,
                host=rt.node_name))
            task.add_done_callback(_log_event_failure)
            _EVENT_TASKS.add(task)
            task.add_done_callback(_EVENT_TASKS.discard)

        puller = pulling.Puller(
            svc, pool, reporter, collector, agent_metrics, post_event,
            pulling.PullOptions(rt.node_name, node.backoff_initial, node.backoff_max),
            max_concurrent_pulls=node.max_concurrent_pulls)
        heartbeat = leases.Heartbeat(
            client, rt.namespace, rt.node_name,
            holder=os.environ.get("POD_NAME") or f"agent-{rt.node_name}",
            duration=LEASE_DURATION_FACTOR * node.heartbeat_interval,
            owner_uid=lambda: supervisor.uid)
        renewals = heartbeating.LeaseRenewals(
            heartbeat.renew, name=f"{rt.namespace}/{leases.heartbeat_name(rt.node_name)}",
            duration=heartbeat.duration, interval=node.heartbeat_interval)
        supervisor = supervising.Supervisor(
            node=rt.node_name, puller=puller, reporter=reporter, collector=collector, pool=pool,
            probes=probes, resync_interval=node.resync_interval,
            heartbeat_interval=node.heartbeat_interval, gc_period=rt.gc_period,
            stats_period=img.stats_collect_period,
            failed_retry_interval=node.failed_retry_interval, renew_lease=renewals.renew)
        ready = asyncio.Event()
        memo: Any = kopf.Memo(supervisor=supervisor, client=client, watch_timeout=WATCH_TIMEOUT)
        watching = asyncio.create_task(_mark_watching(ready, probes))
        assert handlers  # the handlers register themselves with kopf on import
        logger.info("agent starting", extra={"node": rt.node_name, "root": str(rt.root),
                                             "pid": os.getpid()})
        await kopf.operator(clusterwide=True, standalone=True, memo=memo, ready_flag=ready)
        watching.cancel()
    finally:
        probes.stopping = True
        await asyncio.gather(*_EVENT_TASKS, return_exceptions=True)
        await client.aclose()
        await anonymous.aclose()
        await asyncio.to_thread(svc.close)
        await health_server.stop()
        if metrics_server is not None:
            metrics_server.close()
        logger.info("agent stopped", extra={"node": rt.node_name})


_EVENT_TASKS: set[asyncio.Task[None]] = set()


async def _mark_watching(ready: asyncio.Event, probes: health.Health) -> None:
    """kopf raises its ready flag after the startup handler (which read our object) and
    then starts its watch; the watch request goes out at once."""
    await ready.wait()
    probes.watching = True


def _log_event_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            logger.warning(f"cannot post an Event: {task.exception()}")
