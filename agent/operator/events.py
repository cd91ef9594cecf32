"""Kubernetes Events about an ImagePrefetch, from the change of its status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf


def emit_events(body: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any],
                sent: set[str]) -> None:
    """Kubernetes Events for starts, node failures, stalls and completion (each once)."""
    target = cast(kopf.Body, body)  # a kopf.Body in practice; events need only its ref
    if new.get("startTime") and not old.get("startTime") and "started" not in sent:
        sent.add("started")
        kopf.event(target, type="Normal", reason="Started",
                  message=f"dispatching to {new['nodes']['desired']} node(s)")
    for failure in new.get("failures") or []:
        key = f"failed/{failure['node']}/{failure['image']}/{failure['reason']}"
        if key not in sent:
            sent.add(key)
            kopf.warn(target, reason="PullFailed" if failure["reason"] != "PullStalled"
                      else "PullStalled",
                      message=f"{failure['image']} on {failure['node']}: {failure['reason']}:"
                              f" {failure['message']}")
    stalled = int(new.get("stalledCancellations") or 0)
    if stalled > int(old.get("stalledCancellations") or 0):
        kopf.warn(target, reason="PullStalled",
                  message=f"{stalled} pull(s) cancelled for lack of progress so far")
    if old.get("completionTime") and not new.get("completionTime") \
            and old.get("observedGeneration") == new.get("observedGeneration"):
        sent.discard(f"done/{new.get('observedGeneration')}/{old.get('phase')}")
        kopf.event(target, type="Normal", reason="Resumed",
                  message=f"no longer finished: {new['nodes']['pulling']} node(s) pulling again")
    done = f"done/{new.get('observedGeneration')}/{new.get('phase')}"
    if new.get("completionTime") and not old.get("completionTime") and done not in sent:
        sent.add(done)
        if new.get("phase") == "Failed":
            kopf.warn(target, reason="Failed",
                      message=f"finished: {new['nodes']['failed']} node(s) failed")
        else:
            kopf.event(target, type="Normal", reason="Completed",
                      message=f"every image is ready on {new['nodes']['ready']} node(s)")
