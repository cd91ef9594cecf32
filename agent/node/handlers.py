"""kopf handlers of the node agent: thin; the work is in :mod:`.supervising` and below.

- startup: kopf settings (standalone, server-side ``fieldSelector=metadata.name=<node>``
  on NodeImageSets, no CRD scanning, no automatic Events), read the node's NodeImageSet
  once, start the supervisor's loops;
- every event of the node's NodeImageSet: hand the body to the supervisor;
- cleanup (SIGTERM): stop the supervisor (cancel pulls cleanly, write the final status).

The agent registers no daemons, timers or change handlers: those would make kopf put
finalizers and progress annotations on the object, and the agent may write only
``nodeimagesets/status``.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from agent.kube import resources
from agent.node import errors, kubeapi, supervising

logger = logging.getLogger("agent.node")

NODE_SETS = (resources.GROUP, resources.VERSION, resources.NODE_SETS)


def _supervisor(memo: Any) -> supervising.Supervisor:
    supervisor: supervising.Supervisor = memo.supervisor
    return supervisor


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Settings → kopf; the first read of our NodeImageSet; start the loops."""
    supervisor = _supervisor(memo)
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.posting.enabled = False  # Events are posted by the agent itself
    settings.scanning.disabled = True  # no CRD/namespace watches: only our own object
    settings.watching.field_selectors[NODE_SETS] = f"metadata.name={supervisor.node}"
    settings.watching.server_timeout = memo.watch_timeout
    settings.watching.client_timeout = memo.watch_timeout + 60
    try:
        body = await memo.client.get(kubeapi.node_set_path(supervisor.node))
    except kubeapi.APIError as e:
        raise errors.to_kopf(e) from e
    if body is not None:
        supervisor.observe("ADDED", body)
    await supervisor.start()


@kopf.on.event(*NODE_SETS)
async def node_set_changed(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    _supervisor(memo).observe(type, body)


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    await _supervisor(memo).stop()
