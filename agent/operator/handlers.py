"""kopf handlers of the operator: thin; the work is in :mod:`.reconciling` and below.

- startup: apply settings to ``kopf.OperatorSettings``, prime the index (nodes,
  NodeImageSets, the agents' heartbeat Leases) with one (paginated) list each, start the
  agent DaemonSet keeper and the watch of the heartbeat Leases. kopf runs standalone: only
  the replica holding the leader Lease runs kopf at all (:mod:`.main`), so kopf peering is
  off;
- events of Nodes and NodeImageSets: keep the index, wake the prefetches concerned (``async``
  handlers: kopf runs plain ``def`` handlers in threads, which would change the index while
  a reconcile iterates it);
- ImagePrefetch create/update/resume: wake its reconcile loop (a kopf daemon per object,
  level-triggered, which also re-runs every ``resync_interval``);
- ImagePrefetch delete (kopf finalizer ``prefetcher.dev/node-entries``): withdraw the
  entries everywhere and release the secret copies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from agent.kube import resources
from agent.operator import (
    daemonsets,
    errors,
    heartbeats,
    index,
    kubeapi,
    reconciling,
    sweeping,
)
from agent.operator.placement import Placement

logger = logging.getLogger("agent.operator")

PREFETCHES = (resources.GROUP, resources.VERSION, resources.PREFETCHES)
NODE_SETS = (resources.GROUP, resources.VERSION, resources.NODE_SETS)
#: Least pause between two reconciles of one prefetch woken by events (seconds; longer
#: after costly ones: LOOP_SHARE).
MAX_COALESCE = 0.5
#: A Complete prefetch not woken by events is reconciled every this many resync intervals.
SETTLED_RESYNCS = 10
#: The next reconcile of a prefetch waits this many times what the last one held the
#: event loop for, per prefetch (so reconciles together hold at most about half of it).
LOOP_SHARE = 2.0


class PrefetchDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base, built for the ImagePrefetches only. kopf builds one (a deep copy,
    then another to clear its progress fields) for every event of every watched object,
    though only objects with change handlers use it: Nodes and NodeImageSets have event
    handlers only, and at 1,000 nodes those copies of NodeImageSets (100 entries each) were
    a quarter of the operator's CPU during a rollout. Their essence is empty instead."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if body.get("kind") in _EVENTS_ONLY:
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)


#: Kinds the operator watches with event handlers only (no diff-base needed).
_EVENTS_ONLY = frozenset({"Node", resources.NODE_SET_KIND})


def _state(memo: Any) -> index.State:
    state: index.State = memo.state
    return state


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Settings → kopf; prime the index; the DaemonSet keeper; the heartbeat watch."""
    state = _state(memo)
    settings.persistence.finalizer = resources.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=resources.KOPF_ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = PrefetchDiffBase(
        prefix=resources.KOPF_ANNOTATION_PREFIX)
    # kopf's poster would make an Event of every per-object log line at or above this level,
    # one object each; it is not installed (logs.setup, not kopf.configure()), and off: the
    # Events are the recorder's (.event_series: a repeated reason is one Event, counted).
    settings.posting.enabled = False
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # kopf keeps a worker (a task, its queue, the last event's body) per object until the
    # object has been quiet this long (default 5 s): during a rollout at 5,000 nodes that is
    # one per NodeImageSet at once. Its handlers here are short and async; 1 s suffices.
    settings.queueing.idle_timeout = 1.0
    settings.peering.standalone = True  # the leader Lease is the lock (see .main)
    settings.peering.mandatory = False

    try:
        for node in await state.client.list("/api/v1/nodes"):
            state.node_event("ADDED", node)
        for body in await state.client.list(kubeapi.node_set_path()):
            state.node_set_event("ADDED", body)
    except errors.APIError as e:  # retried in seconds, not after kopf's default minute
        raise kopf.TemporaryError(f"cannot prime the index: {e}", delay=2) from e
    # The heartbeats too, before the first reconcile: until they are listed every agent
    # looks dead (a restart or failover would show every pulling node AgentUnavailable).
    # Watched on a thread of their own (see heartbeats.Watcher: observed = received).
    client = state.client
    memo.heartbeat_watcher = heartbeats.Watcher(
        state.heartbeats, lambda: kubeapi.Client(client.connection, on_error=client.on_error),
        state.namespace)
    await memo.heartbeat_watcher.start()
    memo.keeper = asyncio.create_task(keep_daemonset(state))
    memo.sweeper = asyncio.create_task(sweep_periodically(state))


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    for name in ("keeper", "sweeper"):
        task = getattr(memo, name, None)
        if task is not None:
            task.cancel()
    watcher = getattr(memo, "heartbeat_watcher", None)
    if watcher is not None:
        await asyncio.to_thread(watcher.stop)
    await _state(memo).writer.close()
    await _state(memo).recorder.close()
    await _state(memo).client.aclose()


@kopf.on.event("v1", "nodes")
async def node_changed(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type is not None:  # None = the initial listing, already primed at startup
        _state(memo).node_event(type, body)
    else:
        _state(memo).node_event("ADDED", body)


@kopf.on.event(*NODE_SETS)
async def node_set_changed(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    _state(memo).node_set_event(type or "ADDED", dict(body))


@kopf.on.create(*PREFETCHES)
@kopf.on.update(*PREFETCHES)
@kopf.on.resume(*PREFETCHES)
async def prefetch_changed(uid: str, memo: Any, **_: Any) -> None:
    _state(memo).wake(uid)


@kopf.daemon(*PREFETCHES, cancellation_timeout=5.0)
async def run_prefetch(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, memo: Any,
                       logger: kopf.Logger, **_: Any) -> None:
    """The reconcile loop of one ImagePrefetch: on every wake-up, and every resync."""
    state = _state(memo)
    wake = state.wakers.setdefault(uid, asyncio.Event())
    while not stopped:
        wake.clear()
        started = time.monotonic()
        result = ""  # stays "" when cancelled (the daemon is stopping): not observed
        try:
            delay = await reconciling.reconcile(state, body, logger)
            result = "success"
        except errors.APIError as e:
            logger.warning(f"reconcile failed, retrying: {e}")
            delay = 2.0
            result = "error"
        except Exception:
            result = "error"
            raise
        finally:
            if state.metrics is not None and result:
                state.metrics.reconcile_duration.labels(result).observe(
                    time.monotonic() - started)
        timeout = state.settings.resync_interval if delay is None else \
            min(delay, state.settings.resync_interval)
        # A Complete prefetch that wants nothing at a time of its own (delay None) has
        # nothing to do until an event wakes it (its spec, its nodes' statuses, a node or an
        # agent coming or going): its resync, only a safety net against a missed event, runs
        # every SETTLED_RESYNCS intervals. At 5,000 nodes each resync costs a survey of every
        # node; 20 of them every 30 s were ~13 % of a core of steady state.
        settled = delay is None and (state.summaries.get(uid) or ("",))[0] == "Complete"
        for _round in range(SETTLED_RESYNCS if settled else 1):
            try:
                await asyncio.wait_for(wake.wait(), timeout=max(timeout, 0.05))
                break
            except TimeoutError:
                pass
            if stopped:
                break
        # Coalesce wake-ups: node statuses arrive in bursts, and status writes are throttled
        # to one per status_interval anyway; reconcile at most twice per interval.
        # And bound what reconciles take of the event loop: after one that held the loop for
        # c seconds (a survey of every node of this prefetch), the next of this prefetch waits
        # LOOP_SHARE x c per prefetch this operator runs, so all of them together keep at
        # most about half of the loop, and the watches, the writes and Events keep up: at
        # 5,000 nodes a survey takes ~0.3 s, and node churn woke 21 prefetches twice a second
        # each. (Costly reconciles are rare on small clusters: there this adds nothing.)
        spacing = max(min(state.settings.status_interval / 2, MAX_COALESCE),
                      LOOP_SHARE * state.loop_costs.get(uid, 0.0) * len(state.wakers))
        rest = started + spacing - time.monotonic()
        if rest > 0 and not stopped:
            await asyncio.sleep(rest)


@kopf.on.delete(*PREFETCHES)
async def prefetch_deleted(uid: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    try:
        await reconciling.withdraw_everywhere(_state(memo), uid)
    except errors.APIError as e:
        raise errors.to_kopf(e) from e
    logger.info("withdrawn from every node")


async def sweep_periodically(state: index.State) -> None:
    """Notice missed Node deletions and withdraw orphaned entries now and then (see
    :mod:`.sweeping`)."""
    while True:
        await asyncio.sleep(state.settings.resync_interval * sweeping.SWEEP_EVERY)
        try:
            await sweeping.resync_nodes(state)
            await sweeping.sweep_orphans(state)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # retried at the next sweep
            logger.error(f"orphan sweep failed: {e}")


# ------------------------------------------------------------------------------ DaemonSet


async def keep_daemonset(state: index.State) -> None:
    """Keep the agents' DaemonSet as the settings file says; track ready agent pods."""
    keeper = daemonsets.Keeper(state.client, state.namespace, state.settings.agent_daemonset,
                               state.settings.agent_daemonset_owner, recorder=state.recorder)
    while True:
        try:
            await check_daemonset(state, keeper)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep going: a bad file or a failed call is retried
            logger.error(f"agent DaemonSet check failed: {e}")
        await asyncio.sleep(state.settings.daemonset_check_interval)


async def check_daemonset(state: index.State, keeper: daemonsets.Keeper) -> None:
    ready = await keeper.check()
    if keeper.live is not None:
        # The DaemonSet that actually schedules the agents says which nodes they can run on.
        placement = Placement.from_daemonset(keeper.live)
        if placement != state.placement:
            state.placement = placement
            state.wake()
    if ready is not None and ready != state.agent_pods_ready:
        state.agent_pods_ready = ready
        state.wake()
    # Last: a Role that cannot be read must not keep the agents' readiness from the index.
    await state.secret_readers.verify()
