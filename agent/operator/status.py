"""ImagePrefetch.status from the per-node reports: counts, bytes, digests, failures, conditions."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.kube import specs
from agent.operator import dispatching

MAX_FAILURES = 20
CONDITION_TYPES = ("Progressing", "Ready", "Complete", "Failed")


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """One spec.images entry: as written, the entry name, the reference sent, the digest."""

    text: str
    name: str
    reference: str
    digest: str


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> specs.Condition:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


def _stamp(conditions: list[specs.Condition], previous: Sequence[Mapping[str, Any]],
           now: str) -> list[specs.Condition]:
    """Carry lastTransitionTime over from conditions whose status did not change."""
    before = {c.get("type"): c for c in previous}
    for c in conditions:
        old = before.get(c["type"])
        if old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime"):
            c["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = now
    return conditions


def invalid(generation: int, field_message: str, previous: Mapping[str, Any],
            now: str, images: int = 0) -> specs.PrefetchStatus:
    """The status of a prefetch whose spec cannot be used (``images``: how many the spec
    lists; every printer column shows a value, none is blank)."""
    conditions = [
        _condition("Progressing", False, "InvalidSpec", field_message, generation),
        _condition("Ready", False, "InvalidSpec", field_message, generation),
        _condition("Complete", False, "InvalidSpec", field_message, generation),
        _condition("Failed", True, "InvalidSpec", field_message, generation),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "summary": {"images": images, "ready": "0/0", "progress": "0%"},
        "nodes": {"desired": 0, "ready": 0, "pulling": 0, "pending": 0, "failed": 0,
                  "agentUnavailable": 0},
        "stalledCancellations": 0,
        "conditions": _stamp(conditions, previous.get("conditions") or [], now),
    }


def aggregate(
    *,
    generation: int,
    completion_policy: str,
    desired_nodes: Iterable[str],
    dispatched: Iterable[str],
    reports: Mapping[str, dispatching.NodeReport],
    images: Sequence[ResolvedImage],
    previous: Mapping[str, Any],
    now: str,
) -> specs.PrefetchStatus:
    """Compute the whole status.

    Args:
        desired_nodes: the nodes this prefetch is about (selected, or, once finished under
            completionPolicy Always, the selected nodes it was dispatched to).
        dispatched: nodes that have our entries.
        reports: node → report, for dispatched nodes.
        previous: the current status (for times and condition transitions).
    """
    desired = sorted(set(desired_nodes))
    sent = set(dispatched)
    counts: specs.NodeCounts = {"desired": len(desired), "ready": 0, "pulling": 0, "pending": 0,
                                "failed": 0, "agentUnavailable": 0}
    bytes_done = bytes_total = stalled = live_bytes_done = 0
    per_image = {img.name: {"ready": 0, "failed": 0} for img in images}
    failures: list[specs.Failure] = []
    unavailable: list[str] = []
    by_name = {img.name: img for img in images}
    for node in desired:
        rep = reports.get(node)
        if node not in sent or rep is None:
            counts["pending"] += 1
            continue
        if rep.state == dispatching.READY:
            counts["ready"] += 1
        elif rep.state == dispatching.FAILED:
            counts["failed"] += 1
        elif rep.state == dispatching.AGENT_UNAVAILABLE:
            counts["pending"] += 1
            counts["agentUnavailable"] += 1
            unavailable.append(node)
        else:
            counts["pulling"] += 1
        for name, st in rep.images.items():
            if st is None:
                continue
            bytes_done += int(st.get("bytesDone") or 0)
            bytes_total += int(st.get("bytesTotal") or 0)
            stalled += int(st.get("stallCancellations") or 0)
            phase = st.get("phase")
            if phase not in dispatching.FAILED_PHASES:
                live_bytes_done += int(st.get("bytesDone") or 0)
            if name in per_image and phase == "Ready":
                per_image[name]["ready"] += 1
            elif name in per_image and phase in dispatching.FAILED_PHASES:
                per_image[name]["failed"] += 1
                if len(failures) < MAX_FAILURES:
                    failures.append({
                        "node": node,
                        "image": by_name[name].text if name in by_name else name,
                        "reason": str(st.get("reason") or phase),
                        "message": str(st.get("message") or ""),
                    })

    total = len(desired)
    done = counts["ready"] + counts["failed"]
    # Level-triggered: finished while every node is done now (a Failed node whose agent
    # retries makes it unfinished again, until that node is done once more).
    # (Finished before and every node left since: still finished, not "no node".)
    finished = completion_policy != "Never" and done == total and (
        total > 0 or bool(previous.get("completionTime")))
    if total > 0 and counts["ready"] == total:
        percent = 100
    elif bytes_total > 0:  # bytes of failed pulls are not progress
        percent = min(99, live_bytes_done * 100 // bytes_total)
    else:
        percent = 0

    status: specs.PrefetchStatus = {
        "observedGeneration": generation,
        "summary": {"images": len(images), "ready": f"{counts['ready']}/{total}",
                    "progress": f"{percent}%"},
        "nodes": counts,
        "stalledCancellations": stalled,
        "bytesDone": bytes_done,
        "bytesTotal": bytes_total,
        "images": [
            {"image": img.text, "resolved": img.reference, "digest": img.digest,
             "ready": per_image[img.name]["ready"], "failed": per_image[img.name]["failed"]}
            for img in images
        ],
        "failures": failures,
    }
    if previous.get("startTime"):
        status["startTime"] = previous["startTime"]
    elif sent:
        status["startTime"] = now
    if finished:
        status["completionTime"] = previous.get("completionTime") or now

    failed_nodes = counts["failed"]
    ready_msg = f"{counts['ready']}/{total} nodes have every image"
    if total == 0 and not finished:
        progressing = _condition("Progressing", False, "NoMatchingNodes",
                                 "no node matches nodeSelector/nodeNames", generation)
    elif finished:
        progressing = _condition("Progressing", False, "Finished",
                                 f"{counts['ready']} ready, {failed_nodes} failed", generation)
    elif unavailable:
        shown = ", ".join(unavailable[:5]) + (" ..." if len(unavailable) > 5 else "")
        progressing = _condition(
            "Progressing", True, "AgentUnavailable",
            f"{len(unavailable)} node(s) have no live agent: {shown}", generation)
    else:
        progressing = _condition(
            "Progressing", True, "Pulling" if sent else "Dispatching",
            f"{counts['pulling']} pulling, {counts['pending']} pending, {counts['ready']} ready,"
            f" {failed_nodes} failed", generation)
    ready = _condition("Ready", total > 0 and counts["ready"] == total,
                       "AllNodesReady" if total > 0 and counts["ready"] == total
                       else "NodesNotReady", ready_msg, generation)
    if completion_policy == "Never":
        complete = _condition("Complete", False, "KeepingPresent",
                              "completionPolicy Never: images are kept present", generation)
    elif finished and failed_nodes == 0:
        complete = _condition("Complete", True, "AllImagesReady", ready_msg, generation)
    elif finished:
        complete = _condition("Complete", False, "NodesFailed",
                              f"{failed_nodes} node(s) failed", generation)
    else:
        complete = _condition("Complete", False, "InProgress", ready_msg, generation)
    if finished and failed_nodes:
        first = failures[0] if failures else None
        detail = f"; first: {first['node']} {first['image']}: {first['reason']}" if first else ""
        failed = _condition("Failed", True, "PullFailed",
                            f"{failed_nodes} node(s) failed{detail}", generation)
    else:
        failed = _condition("Failed", False, "NoFailure" if not failed_nodes else "InProgress",
                            f"{failed_nodes} node(s) failed so far", generation)

    if finished:  # agrees with completionTime and the Complete/Failed conditions
        status["phase"] = "Failed" if failed_nodes else "Complete"
    elif sent:
        status["phase"] = "Progressing"
    else:
        status["phase"] = "Pending"
    status["conditions"] = _stamp([progressing, ready, complete, failed],
                                  previous.get("conditions") or [], now)
    return status


def conditions_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a write is urgent: a condition's status or reason, or the phase, changed."""
    def key(status: Mapping[str, Any]) -> Any:
        return (status.get("phase"), sorted(
            (c.get("type"), c.get("status"), c.get("reason"))
            for c in status.get("conditions") or []))
    return bool(key(old) != key(new))


def differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether ``new`` says anything ``old`` does not (ignoring transition times)."""
    def strip(status: Mapping[str, Any]) -> Any:
        out = dict(status)
        out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                             for c in status.get("conditions") or []]
        return out
    return bool(strip(old) != strip(new))
