"""ImagePrefetch status writes: only when something changed, throttled unless urgent."""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import Any

from agent.operator import errors, kubeapi, status
from agent.operator.index import State

JSON = dict[str, Any]


async def write_status(state: State, body: Mapping[str, Any], previous: Mapping[str, Any],
                       new: JSON, now: datetime.datetime, *, urgent: bool) -> float | None:
    """Write ``new`` unless nothing changed; throttled unless ``urgent``.

    Returns the seconds to wait before a throttled write may go, or None.
    """
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    if not status.differs(previous, new):
        return None
    clock = time.monotonic()
    delay = state.throttle.delay(uid, clock, urgent=urgent)
    if delay > 0:
        return delay
    patch: JSON = dict(new)
    # Null what the server holds (``body.status``, which may be older or newer than
    # ``previous``) and what we last wrote, but not in ``new``: a merge patch leaves
    # absent keys as they are (a stale completionTime would survive a spec change).
    server = body.get("status") or {}
    for key in {*previous, *server, "completionTime"}:
        if key not in new and key != "kopf":
            patch[key] = None
    try:
        await state.client.merge_patch(
            kubeapi.prefetch_path(meta["namespace"], meta["name"], "status"), {"status": patch})
    except errors.NotFound:
        return None
    state.throttle.written(uid, clock)
    state.statuses[uid] = new
    return None
