"""ImagePrefetch.status from the per-node reports: counts, bytes, digests, failures, conditions."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.kube import specs
from agent.operator import dispatching
from agent.operator.times import parse_time

MAX_FAILURES = 20
CONDITION_TYPES = ("Progressing", "Ready", "Complete", "Failed", "Degraded")
#: Reasons of a Pending image that is not backing off after a failure ("AgentStopped": the
#: agent was stopped mid-pull, e.g. by a DaemonSet rollout, and resumes when it is back).
NOT_RETRYING = frozenset({"", None, "AgentStopped"})
#: Seconds without a byte after which a downloading node shows as stalling.
STALL_AFTER = 60.0
#: Longest node message quoted in a condition.
MAX_MESSAGE = 512


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """One spec.images entry: as written, the entry name, the reference sent, the digest."""

    text: str
    name: str
    reference: str
    digest: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something about the spec that the status must say: ``fatal`` ones fail the prefetch
    at once (``image``: one the registry says does not exist, not dispatched; the other
    images still are), others make it ``Degraded`` (a nodeNames entry that is not a node, a
    pull secret that does not exist)."""

    reason: str
    message: str
    fatal: bool = False
    image: str = ""


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
    problems: Sequence[Problem] = (),
    stall_after: float = STALL_AFTER,
) -> specs.PrefetchStatus:
    """Compute the whole status.

    Args:
        desired_nodes: the nodes this prefetch is about (selected, or, once finished under
            completionPolicy Always, the selected nodes it was dispatched to).
        dispatched: nodes that have our entries.
        reports: node → report, for dispatched nodes.
        previous: the current status (for times and condition transitions).
        problems: what is wrong with the spec (see :class:`Problem`).
        stall_after: seconds without progress after which a downloading node is shown as
            stalling (before its agent's progressTimeout cancels the pull).
    """
    desired = sorted(set(desired_nodes))
    sent = set(dispatched)
    counts: specs.NodeCounts = {"desired": len(desired), "ready": 0, "pulling": 0, "pending": 0,
                                "failed": 0, "agentUnavailable": 0}
    bytes_done = bytes_total = stalled = live_bytes_done = 0
    per_image = {img.name: {"ready": 0, "failed": 0} for img in images}
    failures: list[specs.Failure] = []
    unavailable: list[str] = []
    retrying: list[tuple[str, str, specs.ImageStatus]] = []
    stalling: list[tuple[str, str, specs.ImageStatus]] = []
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
            if rep.state == dispatching.PULLING and st.get("phase") == "Pending" \
                    and st.get("reason") not in NOT_RETRYING:  # backing off before a retry
                retrying.append((node, by_name[name].text if name in by_name else name, st))
            elif rep.state == dispatching.PULLING and st.get("phase") == "Downloading" and \
                    _silent_since(st, now, stall_after):
                stalling.append((node, by_name[name].text if name in by_name else name, st))
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
                        "message": _clip(str(st.get("message") or "")),
                    })

    total = len(desired)
    done = counts["ready"] + counts["failed"]
    # Level-triggered: finished while every node is done now (a Failed node whose agent
    # retries makes it unfinished again, until that node is done once more).
    # (Finished before and every node left since: still finished, not "no node".)
    fatal = [p for p in problems if p.fatal]
    finished = completion_policy != "Never" and done == total and (
        total > 0 or bool(previous.get("completionTime")))
    if total > 0 and counts["ready"] == total:
        percent = 100
    elif bytes_total > 0:  # bytes of failed pulls are not progress
        percent = min(99, live_bytes_done * 100 // bytes_total)
    else:
        percent = 0

    at_prefetch: list[specs.Failure] = [
        {"node": "", "image": p.image, "reason": p.reason, "message": _clip(p.message)}
        for p in fatal if p.image]
    failures = (at_prefetch + failures)[:MAX_FAILURES]
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
    if total == 0 and fatal:
        progressing = _condition("Progressing", False, fatal[0].reason, fatal[0].message,
                                 generation)
    elif total == 0 and not finished:
        progressing = _condition("Progressing", False, "NoMatchingNodes",
                                 "no node matches nodeSelector/nodeNames; waiting for one"
                                 " to join", generation)
    elif finished:
        progressing = _condition("Progressing", False, "Finished",
                                 f"{counts['ready']} ready, {failed_nodes} failed", generation)
    elif unavailable:
        shown = ", ".join(unavailable[:5]) + (" ..." if len(unavailable) > 5 else "")
        progressing = _condition(
            "Progressing", True, "AgentUnavailable",
            f"{len(unavailable)} node(s) have no live agent: {shown}", generation)
    elif stalling:
        node, image, st = stalling[0]
        progressing = _condition(
            "Progressing", True, "Stalling",
            _clip(f"{len(stalling)} pull(s) made no progress for {stall_after:g}s or more;"
                  f" {node} {image}: last progress at {st.get('lastProgressTime')}"
                  f" ({st.get('stalls', 0)} stall(s) so far)"), generation)
    elif retrying:
        node, image, st = retrying[0]
        progressing = _condition(
            "Progressing", True, "Retrying",
            _clip(f"{len(retrying)} pull(s) retrying after a failure; {node} {image}:"
                  f" {st.get('reason')}: {st.get('message', '')}"), generation)
    else:
        progressing = _condition(
            "Progressing", True, "Pulling" if sent else "Dispatching",
            f"{counts['pulling']} pulling, {counts['pending']} pending, {counts['ready']} ready,"
            f" {failed_nodes} failed", generation)
    all_ready = total > 0 and counts["ready"] == total and not fatal
    ready = _condition("Ready", all_ready, "AllNodesReady" if all_ready
                       else fatal[0].reason if fatal else "NodesNotReady", ready_msg, generation)
    if completion_policy == "Never":
        complete = _condition("Complete", False, "KeepingPresent",
                              "completionPolicy Never: images are kept present", generation)
    elif finished and failed_nodes == 0:
        complete = _condition("Complete", True, "AllImagesReady", ready_msg, generation)
    elif fatal:
        complete = _condition("Complete", False, fatal[0].reason, fatal[0].message, generation)
    elif finished:
        complete = _condition("Complete", False, "NodesFailed",
                              f"{failed_nodes} node(s) failed", generation)
    else:
        complete = _condition("Complete", False, "InProgress", ready_msg, generation)
    if fatal:
        failed = _condition("Failed", True, fatal[0].reason,
                            "; ".join(p.message for p in fatal), generation)
    elif finished and failed_nodes:
        first = failures[0] if failures else None
        detail = f"; first: {first['node']} {first['image']}: {first['reason']}" if first else ""
        failed = _condition("Failed", True, "PullFailed",
                            f"{failed_nodes} node(s) failed{detail}", generation)
    else:
        failed = _condition("Failed", False, "NoFailure" if not failed_nodes else "InProgress",
                            f"{failed_nodes} node(s) failed so far", generation)

    others = [p for p in problems if not p.fatal]
    if others:
        degraded = _condition("Degraded", True, others[0].reason,
                              _clip("; ".join(p.message for p in others)), generation)
    else:
        degraded = _condition("Degraded", False, "AsExpected",
                              "every node named and pull secret exists", generation)

    if fatal:  # failed for good; completionTime once the other images are done too
        status["phase"] = "Failed"
    elif finished:  # agrees with completionTime and the Complete/Failed conditions
        status["phase"] = "Failed" if failed_nodes else "Complete"
    elif sent:
        status["phase"] = "Progressing"
    else:
        status["phase"] = "Pending"
    status["conditions"] = _stamp([progressing, ready, complete, failed, degraded],
                                  previous.get("conditions") or [], now)
    return status


def failure_reasons(reports: Mapping[str, dispatching.NodeReport],
                    images: Sequence[ResolvedImage]) -> dict[str, tuple[int, specs.Failure]]:
    """reason → (nodes failed with it, one example), over the nodes' current reports."""
    by_name = {img.name: img.text for img in images}
    out: dict[str, tuple[int, specs.Failure]] = {}
    for node in sorted(reports):
        seen: set[str] = set()
        for name, st in reports[node].images.items():
            if st is None or st.get("phase") not in dispatching.FAILED_PHASES:
                continue
            reason = str(st.get("reason") or st.get("phase"))
            if reason in seen:
                continue
            seen.add(reason)
            count, example = out.get(reason, (0, None))
            example = example or {"node": node, "image": by_name.get(name, name),
                                  "reason": reason,
                                  "message": _clip(str(st.get("message") or ""))}
            out[reason] = (count + 1, example)
    return out


def _silent_since(st: Mapping[str, Any], now: str, seconds: float) -> bool:
    """Whether the image's last progress is at least ``seconds`` before ``now``."""
    last, at = parse_time(st.get("lastProgressTime")), parse_time(now)
    return last is not None and at is not None and (at - last).total_seconds() >= seconds


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


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
