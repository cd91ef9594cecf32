"""kopf handlers of the operator: thin; the work is in :mod:`.reconciling` and below.

- startup: apply settings to ``kopf.OperatorSettings``, prime the index (nodes,
  NodeImageSets, agent pods) with one (paginated) list each, start the agent DaemonSet keeper
  and the watch of the agents' heartbeat Leases. kopf runs standalone: only the replica
  holding the leader Lease runs kopf at all (:mod:`.main`), so kopf peering is off;
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
from agent.operator import daemonsets, errors, kubeapi, reconciling

logger = logging.getLogger("agent.operator")

PREFETCHES = (resources.GROUP, resources.VERSION, resources.PREFETCHES)
NODE_SETS = (resources.GROUP, resources.VERSION, resources.NODE_SETS)
#: Longest pause between two reconciles of one prefetch woken by events (seconds).
MAX_COALESCE = 0.5


def _state(memo: Any) -> reconciling.State:
    state: reconciling.State = memo.state
    return state


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Settings → kopf; prime the index; the DaemonSet keeper; the heartbeat watch."""
    state = _state(memo)
    settings.persistence.finalizer = resources.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=resources.KOPF_ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=resources.KOPF_ANNOTATION_PREFIX)
    settings.posting.level = logging.WARNING  # only warnings become Events by themselves
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.peering.standalone = True  # the leader Lease is the lock (see .main)
    settings.peering.mandatory = False

    try:
        for node in await state.client.list("/api/v1/nodes"):
            state.node_event("ADDED", node)
        for body in await state.client.list(kubeapi.node_set_path()):
            state.node_set_event("ADDED", body)
    except errors.APIError as e:  # retried in seconds, not after kopf's default minute
        raise kopf.TemporaryError(f"cannot prime the index: {e}", delay=2) from e
    memo.keeper = asyncio.create_task(keep_daemonset(state))
    memo.heartbeats = asyncio.create_task(state.heartbeats.run(state.client, state.namespace))


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    for task in (getattr(memo, "keeper", None), getattr(memo, "heartbeats", None)):
        if task is not None:
            task.cancel()
    await _state(memo).writer.close()
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
        try:
            await asyncio.wait_for(wake.wait(), timeout=max(timeout, 0.05))
        except TimeoutError:
            pass
        # Coalesce wake-ups: node statuses arrive in bursts, and status writes are throttled
        # to one per status_interval anyway; reconcile at most twice per interval.
        rest = started + min(state.settings.status_interval / 2, MAX_COALESCE) - time.monotonic()
        if rest > 0 and not stopped:
            await asyncio.sleep(rest)


@kopf.on.delete(*PREFETCHES)
async def prefetch_deleted(uid: str, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    try:
        await reconciling.withdraw_everywhere(_state(memo), uid)
    except errors.APIError as e:
        raise errors.to_kopf(e) from e
    logger.info("withdrawn from every node")


# ------------------------------------------------------------------------------ DaemonSet


async def keep_daemonset(state: reconciling.State) -> None:
    """Keep the agents' DaemonSet as the settings file says; track ready agent pods."""
    while True:
        try:
            await check_daemonset(state)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep going: a bad file or a failed call is retried
            logger.error(f"agent DaemonSet check failed: {e}")
        await asyncio.sleep(state.settings.daemonset_check_interval)


async def check_daemonset(state: reconciling.State) -> None:
    path = state.settings.agent_daemonset
    if not path:
        return
    owner = None
    if state.settings.agent_daemonset_owner:
        owner_name = state.settings.agent_daemonset_owner
        owner = await state.client.get(kubeapi.configmap_path(state.namespace, owner_name))
        if owner is None or (owner.get("metadata") or {}).get("deletionTimestamp"):
            # Uninstalling: the garbage collector removes the DaemonSet; do not recreate it.
            if not state.owner_missing:
                logger.warning(f"ConfigMap {state.namespace}/{owner_name} (the agent"
                               " DaemonSet's owner) does not exist; not keeping the DaemonSet")
            state.owner_missing = True
            return
        state.owner_missing = False
    wanted = daemonsets.desired(daemonsets.load(path), state.namespace, owner)
    name = wanted["metadata"]["name"]
    live = await state.client.get(kubeapi.daemonset_path(state.namespace, name))
    if live is None:
        await state.client.create(kubeapi.daemonset_path(state.namespace), wanted)
        logger.info(f"created the agent DaemonSet {state.namespace}/{name}")
    elif daemonsets.drifted(live, wanted):
        wanted["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        await state.client.replace(kubeapi.daemonset_path(state.namespace, name), wanted)
        logger.info(f"restored the agent DaemonSet {state.namespace}/{name} to its settings")
    selector = (wanted.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = await state.client.list(kubeapi.pods_path(state.namespace),
                                   labelSelector=label_selector)
    ready = daemonsets.ready_nodes(pods)
    if ready != state.agent_pods_ready:
        state.agent_pods_ready = ready
        state.wake()
