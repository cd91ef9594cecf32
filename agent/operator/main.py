"""``prefetcher operator``: settings → connection → leader election → kopf, cluster-wide.

Replicas elect one leader through a ``coordination.k8s.io`` Lease (``operator.peering_name``
in ``runtime.namespace``; :class:`agent.kube.leases.LeaderElector`, as client-go, on a thread
of its own with its own client: :class:`agent.kube.leases.ElectorThread`). Only the
leader runs kopf, so only the leader writes anything (handlers, status, the agents'
DaemonSet keeper). Every replica answers ``/healthz`` from start to exit, with its role
(``standby`` or ``leader``), so a rolling update with ``maxUnavailable: 0`` proceeds and a
probe never falls between two servers. The leader that cannot renew the Lease within
``lease_renew_deadline`` exits at once from the elector's thread (exit code 1, as
controller-runtime does), however busy the event loop of kopf and the reconciles is: it stops
writing and its pod restarts as a standby. On SIGTERM the leader stops kopf, then
releases the Lease so a standby takes over within ``lease_retry_period``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from typing import Any

import aiohttp.web
import kopf

from agent import config, logs, metrics, telemetry
from agent.kube import leases
from agent.operator import handlers, kubeapi, reconciling, throttling

logger = logging.getLogger("agent.operator")

#: Exit code of a leader that lost its Lease.
LOST_LEASE_EXIT = 1


def identity() -> str:
    """This replica's leader-election identity: the pod name (a container restarted in the
    same pod takes its lease back at once), else ``<hostname>_<pid>`` (unique per process)."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


def run(settings: config.Settings, *, verbose: bool = False) -> int:
    """Run the operator until it is stopped (SIGINT/SIGTERM)."""
    op = settings.operator
    rt = settings.runtime
    # runtime.log_format/log_level for every line, kopf's included (not kopf.configure()).
    logs.setup("debug" if verbose else rt.log_level, rt.log_format)
    connection = kubeapi.load_connection(rt.kubeconfig, rt.kube_context)

    @kopf.on.login()
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection.to_kopf()  # re-reads a token file (kopf calls it again after 401)

    operator_metrics = metrics.OperatorMetrics()
    tracing = telemetry.setup(
        "prefetcher-operator",
        enabled=settings.tracing.enabled,
        http_client_spans=settings.tracing.http_client_spans,
    )

    async def operate() -> None:
        state = reconciling.State(
            settings=op, namespace=rt.namespace,
            client=kubeapi.Client(connection, on_error=operator_metrics.api_error),
            registry_config_path=settings.images.registry.config_path,
            throttle=throttling.Throttle(op.status_interval), metrics=operator_metrics,
        )
        memo: Any = kopf.Memo(state=state)
        await kopf.operator(clusterwide=True, standalone=True, memo=memo)

    async def main() -> int:
        # One /healthz for the process's whole life, standing by and leading alike: no gap
        # between a standby's server and kopf's for a probe to fall into.
        role = {"role": "standby" if not op.standalone else "leader"}
        async with _health(rt.health_address, role):
            if op.standalone:
                await operate()
                return 0
            return await elect_and_operate(role)

    async def elect_and_operate(role: dict[str, str]) -> int:
        # The elector runs on a thread of its own with its own client (as client-go's in
        # its own goroutine): reconciles of thousands of nodes keep this loop busy for
        # seconds, and a renewal waiting behind them would miss the renew deadline.
        elector = leases.ElectorThread(
            lambda: kubeapi.Client(connection), rt.namespace, op.peering_name, identity(),
            on_lost=lost, lease_duration=op.lease_duration,
            renew_deadline=op.lease_renew_deadline, retry_period=op.lease_retry_period)
        await elector.acquire()
        role["role"] = "leader"
        try:
            await operate()
        finally:
            await asyncio.to_thread(elector.stop)  # releases the Lease (a clean stop)
        return 0

    def lost(error: leases.LostLeadership) -> None:
        """On the elector's thread: stop every write now, as controller-runtime does, even
        while this process's event loop is busy."""
        logger.error(f"leader election lost, exiting: {error}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(LOST_LEASE_EXIT)

    assert handlers  # the handlers register themselves with kopf on import
    server = metrics.serve(rt.metrics_address, operator_metrics.registry)
    if server is not None:
        logger.info(f"metrics on {server.url}")
    try:
        return asyncio.run(main())
    finally:
        if server is not None:
            server.close()
        tracing.shutdown()


@contextlib.asynccontextmanager
async def _health(address: str, role: dict[str, str]) -> Any:
    """Answer ``/healthz`` with 200 and this replica's role while the event loop runs."""
    if not address:
        yield
        return
    host, _, port = address.rpartition(":")

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(role)

    app = aiohttp.web.Application()
    app.router.add_get("/healthz", healthz)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, host or "0.0.0.0", int(port), reuse_address=True)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()
