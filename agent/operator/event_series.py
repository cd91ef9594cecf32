"""Kubernetes Events as a series, the way client-go's event recorder makes them.

The first Event of a reason about an object is created (core/v1, ``count: 1``); a repeat
of the same type and reason about the same object PATCHes that Event (``count`` + 1,
``lastTimestamp``, the latest ``message``) instead of creating another, so ``kubectl
describe`` shows one line, "x5 over 10m", and ``kubectl events`` one row with its count.
An Event that expired meanwhile (the API server keeps them an hour by default) is created
again. Which repeats are worth an Event at all (and so the rate) is decided by the callers
(:mod:`.events`: failures per reason when their count doubles).

Events are posted in order by one background task: recording never blocks a reconcile, and
a failure to post is logged, not raised (an Event is never worth a failed reconcile).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from agent.operator import errors, kubeapi

logger = logging.getLogger("agent.operator")

JSON = dict[str, Any]
COMPONENT = "image-prefetcher-operator"
#: Events waiting to be posted; past this many, new ones are dropped (and counted).
QUEUE_LIMIT = 1000
MAX_MESSAGE = 1024


@dataclasses.dataclass
class Series:
    """The Event that stands for one (object, type, reason), as last written."""

    namespace: str
    name: str
    count: int
    first: str


def involved(body: Mapping[str, Any]) -> JSON:
    """The ``involvedObject`` reference of an object ``body``."""
    meta = body.get("metadata") or {}
    ref = {"apiVersion": body.get("apiVersion", ""), "kind": body.get("kind", ""),
           "name": meta.get("name", ""), "namespace": meta.get("namespace", ""),
           "uid": meta.get("uid", "")}
    return {k: v for k, v in ref.items() if v}


def default_instance() -> str:
    """``reportingInstance``: the pod's name (``POD_NAME``), else the host's."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Records Events about objects; repeats of a (object, type, reason) patch one Event.

    Args:
        client: the API client (needs ``create`` and ``patch`` on events).
        instance: ``reportingInstance`` (the pod's name).
    """

    def __init__(self, client: kubeapi.Client, instance: str = "") -> None:
        self.client = client
        self.instance = instance or default_instance()
        #: (uid, type, reason) → the Event standing for it.
        self.series: dict[tuple[str, str, str], Series] = {}
        self.dropped = 0
        self._queue: asyncio.Queue[tuple[JSON, str, str, str]] = asyncio.Queue(QUEUE_LIMIT)
        self._worker: asyncio.Task[None] | None = None

    def record(self, body: Mapping[str, Any], type: str, reason: str, message: str) -> None:
        """Queue an Event about ``body`` (a Kubernetes object): ``type`` Normal or Warning."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(),
                                                                  name="event-recorder")
        try:
            self._queue.put_nowait((involved(body), type, reason, message[:MAX_MESSAGE]))
        except asyncio.QueueFull:
            self.dropped += 1

    def forget(self, uid: str) -> None:
        """The object is gone: forget its series."""
        for key in [k for k in self.series if k[0] == uid]:
            del self.series[key]

    async def flush(self) -> None:
        """Wait until every Event recorded so far was posted (or failed)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _work(self) -> None:
        while True:
            ref, type, reason, message = await self._queue.get()
            try:
                await self.post(ref, type, reason, message)
            except asyncio.CancelledError:
                raise
            except errors.APIError as e:
                logger.warning(f"cannot post the Event {reason} about {ref.get('kind')}"
                               f" {ref.get('namespace', '')}/{ref.get('name')}: {e}")
            except Exception:  # pragma: no cover - a bug; keep posting the others
                logger.exception("cannot post an Event")
            finally:
                self._queue.task_done()

    async def post(self, ref: Mapping[str, Any], type: str, reason: str, message: str) -> None:
        """Create the Event of (object, type, reason), or patch it if it exists."""
        key = (str(ref.get("uid", "")), type, reason)
        now = _now()
        series = self.series.get(key)
        if series is not None:
            path = f"/api/v1/namespaces/{series.namespace}/events/{series.name}"
            try:
                await self.client.merge_patch(path, {
                    "count": series.count + 1, "lastTimestamp": now, "message": message})
            except errors.NotFound:  # expired: a new series
                del self.series[key]
            else:
                series.count += 1
                return
        namespace = str(ref.get("namespace") or "default")
        name = f"{ref.get('name', 'object')}.{uuid.uuid4().hex[:16]}"
        await self.client.create(f"/api/v1/namespaces/{namespace}/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": dict(ref),
            "type": type, "reason": reason, "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self.instance,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })
        self.series[key] = Series(namespace, name, 1, now)
