"""``prefetcher operator``: settings → connection → kopf, cluster-wide, one active replica."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from agent import config, logs, metrics, telemetry
from agent.operator import handlers, kubeapi, reconciling, throttling

logger = logging.getLogger("agent.operator")


def _health_url(address: str) -> str | None:
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return f"http://{host or '0.0.0.0'}:{port}/healthz"


def run(settings: config.Settings, *, verbose: bool = False) -> int:
    """Run the operator until it is stopped (SIGINT/SIGTERM)."""
    op = settings.operator
    rt = settings.runtime
    # runtime.log_format/log_level for every line, kopf's included (not kopf.configure()).
    logs.setup("debug" if verbose else rt.log_level, rt.log_format)
    connection = kubeapi.load_connection(rt.kubeconfig, rt.kube_context)

    @kopf.on.login()
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection.to_kopf()

    operator_metrics = metrics.OperatorMetrics()
    tracing = telemetry.setup(
        "prefetcher-operator",
        enabled=settings.tracing.enabled,
        http_client_spans=settings.tracing.http_client_spans,
    )

    async def main() -> None:
        state = reconciling.State(
            settings=op, namespace=rt.namespace,
            client=kubeapi.Client(connection, on_error=operator_metrics.api_error),
            registry_config_path=settings.images.registry.config_path,
            throttle=throttling.Throttle(op.status_interval), metrics=operator_metrics,
        )
        memo: Any = kopf.Memo(state=state, peering_name=op.peering_name,
                              standalone=op.standalone)
        await kopf.operator(
            clusterwide=True, standalone=op.standalone,
            peering_name=None if op.standalone else op.peering_name,
            liveness_endpoint=_health_url(rt.health_address), memo=memo,
        )

    assert handlers  # the handlers register themselves with kopf on import
    server = metrics.serve(rt.metrics_address, operator_metrics.registry)
    if server is not None:
        logger.info(f"metrics on {server.url}")
    try:
        asyncio.run(main())
    finally:
        if server is not None:
            server.close()
        tracing.shutdown()
    return 0

