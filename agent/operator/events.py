"""Kubernetes Events about an ImagePrefetch, from the change of its status.

Which Events, and how often: each once, failures per reason when their count doubles. They
are posted by :class:`.event_series.EventRecorder`: the repeats of a reason patch one Event
(its ``count`` and ``lastTimestamp``), as client-go's recorder does."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.kube import specs
from agent.operator import status

#: Posts one Event about the prefetch: (type, reason, message).
Post = Callable[[str, str, str], None]


def emit_events(post: Post, old: Mapping[str, Any], new: Mapping[str, Any],
                sent: set[str], problems: Sequence[status.Problem] = (),
                failure_reasons: Mapping[str, tuple[int, specs.Failure]] | None = None) -> None:
    """Kubernetes Events for starts, problems of the spec, node failures (aggregated per
    reason), stalls and completion (each once)."""
    def warn(reason: str, message: str) -> None:
        post("Warning", reason, message)

    generation = new.get("observedGeneration")
    for problem in problems:
        key = f"problem/{generation}/{problem.reason}/{problem.message}"
        if key not in sent:
            sent.add(key)
            warn(problem.reason, problem.message)
    nodes = new.get("nodes") or {}
    if not nodes.get("desired") and not new.get("completionTime") \
            and f"nonodes/{generation}" not in sent and not problems:
        sent.add(f"nonodes/{generation}")
        warn("NoMatchingNodes",
             "no node matches spec.nodeSelector/nodeNames; waiting for one to join")
    if new.get("startTime") and not old.get("startTime") and "started" not in sent:
        sent.add("started")
        post("Normal", "Started", f"dispatching to {new['nodes']['desired']} node(s)")
    # Aggregated: one Event per reason per prefetch generation, repeated with the count when
    # it has doubled (1, 2, 4, 8... nodes), so a bad tag on 5,000 nodes is 13 writes of one
    # Event object (its series count), not 5,000 Events.
    for reason, (count, example) in sorted((failure_reasons or {}).items()):
        mark = _power_of_two(count)
        key = f"failed/{generation}/{reason}/{mark}"
        if key not in sent:
            sent.add(key)
            warn("PullStalled" if reason == "PullStalled" else "PullFailed",
                 f"{count} node(s) failed with {reason}; e.g. {example['image']} on"
                 f" {example['node']}: {example['message']}")
    down = int(nodes.get("agentUnavailable") or 0)
    key = f"agents/{generation}/{_power_of_two(down)}"
    if down and key not in sent:
        sent.add(key)
        progressing: Mapping[str, Any] = next((c for c in new.get("conditions") or []
                            if c.get("type") == "Progressing"), {})
        warn("AgentUnavailable",
             f"{down} node(s) have no live agent ({progressing.get('message', '')})")
    stalled = int(new.get("stalledCancellations") or 0)
    key = f"stalled/{generation}/{_power_of_two(stalled)}"
    if stalled and key not in sent:
        sent.add(key)
        warn("PullStalled", f"{stalled} pull(s) cancelled for lack of progress so far")
    if old.get("completionTime") and not new.get("completionTime") \
            and old.get("observedGeneration") == new.get("observedGeneration"):
        sent.discard(f"done/{new.get('observedGeneration')}/{old.get('phase')}")
        post("Normal", "Resumed",
             f"no longer finished: {new['nodes']['pulling']} node(s) pulling again")
    done = f"done/{new.get('observedGeneration')}/{new.get('phase')}"
    if new.get("completionTime") and not old.get("completionTime") and done not in sent:
        sent.add(done)
        if new.get("phase") == "Failed":
            warn("Failed", f"finished: {new['nodes']['failed']} node(s) failed")
        else:
            post("Normal", "Completed", f"every image is ready on {new['nodes']['ready']} node(s)")


def _power_of_two(n: int) -> int:
    """The largest power of two not above ``n`` (0 for 0)."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0
