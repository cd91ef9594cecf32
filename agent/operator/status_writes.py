"""ImagePrefetch status writes: only when something changed, throttled unless urgent."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

from agent.operator import errors, kubeapi, status
from agent.operator.index import State

JSON = dict[str, Any]
logger = logging.getLogger("agent.operator")


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
    # The whole status is replaced (the merge-patch equivalent would have to null what the
    # server holds, ``body.status``, and what we last wrote, or a stale completionTime
    # would survive a spec change), and only on the object this status was computed for:
    # a JSON patch whose first operation tests metadata.uid, so a prefetch deleted and
    # re-created under the same name since ``body`` was read is left alone (422, nothing
    # written), as it would be with a DeleteOptions uid precondition.
    value: JSON = dict(new)
    server = body.get("status") or {}
    if "kopf" in server:  # kopf's own bookkeeping, if it keeps any there
        value["kopf"] = server["kopf"]
    try:
        await state.client.json_patch(
            kubeapi.prefetch_path(meta["namespace"], meta["name"], "status"),
            uid_guarded(uid, [{"op": "add", "path": "/status", "value": value}]))
    except errors.NotFound:
        return None
    except errors.Invalid as e:
        if not replaced(e):
            raise
        logger.info(f"ImagePrefetch {meta['namespace']}/{meta['name']} is no longer uid"
                    f" {uid} (deleted and re-created): its status not written")
        return None
    state.throttle.written(uid, clock)
    state.statuses[uid] = new
    return None


def uid_guarded(uid: str, operations: list[JSON]) -> list[JSON]:
    """``operations`` (a JSON patch) applied only to the object whose uid is ``uid``."""
    return [{"op": "test", "path": "/metadata/uid", "value": uid}, *operations]


def replaced(error: errors.APIError) -> bool:
    """Whether a 422 is the failed uid test of :func:`uid_guarded` (the API server and the
    emulator both name the path tested)."""
    return error.status == 422 and "/metadata/uid" in error.message
