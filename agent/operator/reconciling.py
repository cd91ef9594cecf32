"""One reconcile of one ImagePrefetch, and its withdrawal on delete.

:func:`reconcile` is level-triggered: from the prefetch body and the index
(:class:`.index.State`) it decides the writes (pure functions in :mod:`.dispatching`,
:mod:`.entries`, :mod:`.status`), performs them, and returns when it wants to run again.
"""

from __future__ import annotations

import datetime
import functools
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from agent import telemetry
from agent.kube import specs
from agent.operator import (
    dispatching,
    entries,
    errors,
    kubeapi,
    nodes,
    prefetches,
    status,
    traceparents,
    writing,
)
from agent.operator.digests import Memo, resolved_digests
from agent.operator.events import emit_events
from agent.operator.index import State
from agent.operator.secret_copies import ensure_secret_copies, release_secret_copies
from agent.operator.status_writes import write_status
from agent.operator.times import parse_time, timestamp, utcnow

__all__ = ["State", "reconcile", "withdraw_everywhere"]

_tracer = trace.get_tracer("agent.operator")

JSON = dict[str, Any]


async def reconcile(state: State, body: Mapping[str, Any], logger: Any) -> float | None:
    """Bring one ImagePrefetch's NodeImageSet entries and status up to date.

    Returns the seconds after which it wants to run again (a throttled status write or a
    TTL), or None to wait for events / the resync interval.
    """
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    if meta.get("deletionTimestamp") or uid in state.writer.retired:
        return None  # being deleted: the delete handler withdraws; dispatch nothing more
    generation = int(meta.get("generation") or 0)
    now = utcnow()
    now_text = timestamp(now)
    previous: JSON = dict(state.statuses.get(uid) or body.get("status") or {})
    if previous.get("observedGeneration") not in (None, generation):
        previous.pop("completionTime", None)  # a changed spec runs again
    sent = state.events_sent.setdefault(uid, set())

    try:
        prefetch = prefetches.parse(body)
        copies, sources, missing_secrets = await ensure_secret_copies(state, prefetch, logger)
    except errors.InvalidSpec as e:
        listed = (body.get("spec") or {}).get("images")
        new = status.invalid(generation, str(e), previous, now_text,
                             len(listed) if isinstance(listed, list) else 0)
        if f"invalid/{generation}" not in sent:
            sent.add(f"invalid/{generation}")
            state.recorder.record(body, "Warning", "InvalidSpec", str(e))
        state.summarise(uid, new)
        await write_status(state, body, previous, dict(new), now, urgent=True)
        return None

    if f"secrets/{generation}" not in sent:
        await release_secret_copies(state, uid, keep=set(copies))
        sent.add(f"secrets/{generation}")
    memo = await resolved_digests(state, prefetch, previous, sources)
    held_since = time.perf_counter()  # the loop is ours until the next await
    held = 0.0
    traceparent = state.traceparents.get((uid, generation))
    if traceparent is None:
        # The trace of this prefetch generation: a root reconcile span and its first
        # dispatch span, whose context every NodeImageSet entry carries, so each node's
        # pull span is a child of it (one trace from kubectl apply to the last layer).
        attributes: dict[str, str | int] = {
            "prefetch.namespace": prefetch.namespace,
            "prefetch.name": prefetch.name,
            "prefetch.generation": generation,
            "prefetch.images": len(prefetch.images),
        }
        with _tracer.start_as_current_span("agent.operator.reconcile", attributes=attributes):
            with _tracer.start_as_current_span("agent.operator.dispatch"):
                traceparent = traceparents.current()
        state.traceparents[(uid, generation)] = traceparent

    desired: dict[str, specs.ImageEntry] = {}
    resolved: list[status.ResolvedImage] = []
    for text, ref in prefetch.images:
        digest = memo.digests.get(str(ref), "")
        mine = entries.contribution(prefetch, ref, digest, copies, traceparent)
        if str(ref) not in memo.not_found:  # failed at the prefetch, once
            desired[mine["name"]] = mine
        sent_ref = f"{ref.name}@{digest}" if digest else str(ref)
        resolved.append(status.ResolvedImage(text, mine["name"], sent_ref, digest))
    for key in [k for k in state.contributions if k[0] == uid and k[1] not in desired]:
        del state.contributions[key]
    for name, mine in desired.items():
        state.contributions[(uid, name)] = mine

    live = state.live_agents(now)
    clock = time.monotonic()

    def survey() -> tuple[dict[str, dict[str, specs.ImageEntry]],
                          dict[str, dispatching.NodeReport]]:
        dispatched = dict(state.by_owner.get(uid) or {})
        reports = {
            node: dispatching.report(node, ours, state.node_sets[node].get("status"),
                                     node in live, state.node_statuses.get(node),
                                     state.dispatched_generation(uid, node),
                                     state.agent_down_for(node, live, clock))
            for node, ours in dispatched.items()
        }
        return dispatched, reports

    dispatched, reports = survey()
    targets = nodes.select(prefetch, state.nodes.values(), dispatched, state.runnable)
    frozen = prefetch.completion_policy == "Always" and bool(previous.get("completionTime"))
    if frozen:
        targets = [t for t in targets if t in dispatched]
    if not desired:  # every image failed at the prefetch: no node has anything to do
        targets = []
    plan = dispatching.plan(targets, dispatched, desired, reports, prefetch.parallelism,
                            frozen, state.contributions,
                            grace=state.settings.agent_heartbeat_timeout)

    put_ours = writing.Change(uid, desired)
    drop_ours = writing.Change(uid, None)
    writes: dict[str, writing.Change] = {}
    for node in (*plan.dispatch, *plan.refresh):
        writes[node] = put_ours
    for node in plan.withdraw:
        writes[node] = drop_ours
    retry_soon = False
    if writes:
        # Surveyed again after the writes: not kept while they wait (at 5,000 nodes the
        # reports of 20 prefetches, each waiting for its writes, were ~100k objects).
        dispatched, reports = {}, {}
        with telemetry.remote_parent(traceparent), _tracer.start_as_current_span(
            "agent.operator.write_nodes",
            attributes={"nodes.dispatched": len(plan.dispatch), "nodes.refreshed":
                        len(plan.refresh), "nodes.withdrawn": len(plan.withdraw)},
        ):
            held += time.perf_counter() - held_since
            failed = await state.writer.write(writes, logger)
            held_since = time.perf_counter()
        retry_soon = bool(failed)
        if state.metrics is not None:
            done = len(set(plan.dispatch) - set(failed))
            state.metrics.dispatches.inc(done * len(desired))
        dispatched, reports = survey()
    if plan.dispatch:
        logger.info(f"dispatched to {len(plan.dispatch)} node(s): {', '.join(plan.dispatch[:10])}")
    if plan.withdraw:
        logger.info(f"withdrew from {len(plan.withdraw)} node(s) that stopped matching")

    problems = _problems(state, prefetch, memo, missing_secrets)  # after the writes' refusals
    new = status.aggregate(
        generation=generation, completion_policy=prefetch.completion_policy,
        desired_nodes=targets, dispatched=dispatched, reports=reports, images=resolved,
        previous=previous, now=now_text, problems=problems,
    )
    state.summarise(uid, new)
    emit_events(functools.partial(state.recorder.record, body), previous, dict(new), sent,
                problems, status.failure_reasons(reports, resolved))
    urgent = status.conditions_changed(previous, dict(new))
    # What this reconcile cost the event loop: the reconcile loop spaces the next by it.
    state.loop_costs[uid] = held + time.perf_counter() - held_since
    wait = await write_status(state, body, previous, dict(new), now, urgent=urgent)

    if memo.unresolved([ref for _, ref in prefetch.images]) and state.settings.resolve_digests:
        again = max(memo.retry_at - time.monotonic(), 0.05)  # ask the registry again
        wait = again if wait is None else min(wait, again)
    if retry_soon:
        wait = 1.0 if wait is None else min(wait, 1.0)
    ttl = prefetch.ttl_seconds_after_finished
    finished_at = parse_time(new.get("completionTime"))
    if ttl is not None and finished_at is not None:
        remaining = (finished_at + datetime.timedelta(seconds=ttl) - now).total_seconds()
        if remaining <= 0:
            logger.info(f"finished {ttl}s ago (ttlSecondsAfterFinished); deleting")
            try:  # this prefetch, not one re-created under its name since it was read
                await state.client.delete(
                    kubeapi.prefetch_path(prefetch.namespace, prefetch.name), uid=uid)
            except errors.Conflict as e:
                logger.info(f"not deleted: the name is now another ImagePrefetch's ({e})")
            return None
        wait = remaining if wait is None else min(wait, remaining)
    return wait


def _problems(state: State, prefetch: prefetches.Prefetch, memo: Memo,
              missing_secrets: list[str]) -> list[status.Problem]:
    """What the status must say about the spec's references, nodes and secrets."""
    problems = [
        status.Problem("ImageNotFound", f"{text}: the registry says it does not exist"
                       f" ({memo.not_found[str(ref)]}); not dispatched to any node",
                       fatal=True, image=text)
        for text, ref in prefetch.images if str(ref) in memo.not_found
    ]
    if prefetch.node_names:
        absent = sorted(n for n in prefetch.node_names if n not in state.nodes)
        if absent:
            shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
            problems.append(status.Problem(
                "NodeNotFound", f"spec.nodeNames: {len(absent)} name(s) are not nodes: {shown}"))
    if prefetch.node_names:
        refused = {n: state.placement.why_not(state.nodes[n]) for n in
                   sorted(prefetch.node_names) if n in state.nodes}
        refused = {n: why for n, why in refused.items() if why}
        if refused:
            shown = "; ".join(f"{n}: {why}" for n, why in list(refused.items())[:5])
            problems.append(status.Problem(
                "AgentCannotRun", f"spec.nodeNames: the agent cannot run on {len(refused)}"
                f" named node(s), not targeted: {shown}"))
    full = sorted((node, why) for (owner, node), why in state.writer.refused.items()
                  if owner == prefetch.uid)
    if full:
        problems.append(status.Problem(
            "NodeImageSetFull", f"not dispatched to {len(full)} node(s) whose NodeImageSet is"
            f" at a cap: {full[0][0]}: {full[0][1]}"))
    if missing_secrets:
        problems.append(status.Problem(
            "PullSecretNotFound", f"spec.imagePullSecrets: {', '.join(missing_secrets)} do(es)"
            f" not exist in namespace {prefetch.namespace}; pulls go without them"))
    return problems


async def withdraw_everywhere(state: State, uid: str) -> None:
    """Remove ``uid`` from every NodeImageSet and every secret copy (on delete)."""
    state.writer.retired.add(uid)  # from now on, any put of this prefetch is a withdrawal
    # The index holds every write of ours (the writer stores what each write returned), so
    # no list of every NodeImageSet (~100 MiB at 5,000 nodes); should the watch have missed
    # something, :func:`.sweeping.sweep_orphans` withdraws it later.
    nodes_with_ours = sorted(state.by_owner.get(uid) or {})
    drop = writing.Change(uid, None)
    failed = await state.writer.write({node: drop for node in nodes_with_ours})
    if failed:
        raise errors.Conflict(409, "Conflict", f"could not withdraw from {', '.join(failed)}")
    await release_secret_copies(state, uid)
    state.forget(uid)
