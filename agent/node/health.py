"""``/healthz`` and ``/readyz`` of the node agent, served on ``runtime.health_address``.

- ``/healthz``: 200 while the process's event loop answers (the handler runs on it, so a
  wedged loop fails the probe by timing out) and the agent's loops have not died.
- ``/readyz``: 200 once the store is open and the watch of the agent's NodeImageSet is
  established (kopf started and the object was read once), 503 with the missing piece
  named otherwise, and again 503 while shutting down.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from aiohttp import web

from agent import metrics

logger = logging.getLogger("agent.node")


@dataclasses.dataclass
class Health:
    """What the probes report; the supervisor flips these flags."""

    store_open: bool = False
    watching: bool = False
    stopping: bool = False
    broken: str = ""

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.store_open:
            return False, "store not open"
        if not self.watching:
            return False, "watch of the NodeImageSet not established"
        return True, "ok"


class HealthServer:
    """An aiohttp server for :class:`Health` on the agent's loop."""

    def __init__(self, health: Health, address: str) -> None:
        self.health = health
        self.address = address
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        parsed = metrics.parse_address(self.address)
        if parsed is None:
            return
        host, port = parsed
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server: Any = site._server  # the bound port, for port 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        if self.health.broken:
            return web.Response(status=503, text=f"unhealthy: {self.health.broken}\n")
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self.health.ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")
