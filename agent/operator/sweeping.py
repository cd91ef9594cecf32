"""Periodic sweeps: Nodes whose deletion was missed, and entries whose owning
ImagePrefetch no longer exists (withdrawn).

Deletes withdraw their entries (the finalizer), and puts queued before a delete become
withdrawals when written; what can still slip through (a delete handled while the watch
had a gap, a finalizer removed by hand, a crash between the two) is found here: every
``SWEEP_EVERY`` resync intervals the owners in the index are compared with a (paginated
by the client) list of the ImagePrefetches that exist, and the owners that are gone are
withdrawn everywhere, as a delete would have done.
"""

from __future__ import annotations

import logging

from agent.kube import resources
from agent.operator import reconciling
from agent.operator.index import State

logger = logging.getLogger("agent.operator")

#: A sweep every this many resync intervals (5 minutes with the default 30s).
SWEEP_EVERY = 10


def prefetches_path() -> str:
    return f"/apis/{resources.API_VERSION}/{resources.PREFETCHES}"


async def resync_nodes(state: State) -> list[str]:
    """Bring the index's nodes in line with a fresh list: a Node deleted while the watch
    had a gap (a relist after 410 Gone emits no DELETED) is forgotten here, so no prefetch
    waits for it. The names of the nodes forgotten are returned."""
    listed = {str((n.get("metadata") or {}).get("name", "")): n
              for n in await state.client.list("/api/v1/nodes")}
    gone = sorted(set(state.nodes) - set(listed))
    for name in gone:
        logger.info(f"Node {name} no longer exists (its deletion was not seen); forgetting it")
        state.node_event("DELETED", {"metadata": {"name": name}})
    for body in listed.values():
        state.node_event("MODIFIED", body)
    return gone


async def sweep_orphans(state: State) -> list[str]:
    """Withdraw the entries of owners that do not exist; their uids are returned."""
    owners = set(state.by_owner)  # first: an owner seen here and not listed next is gone
    if not owners:
        return []
    existing = {str((p.get("metadata") or {}).get("uid", ""))
                for p in await state.client.list(prefetches_path())}
    gone = sorted(owners - existing - set(state.wakers))
    for uid in gone:
        nodes = len(state.by_owner.get(uid) or {})
        logger.warning(f"ImagePrefetch {uid} no longer exists but owns entries on {nodes}"
                       " node(s); withdrawing them")
        await reconciling.withdraw_everywhere(state, uid)
    return gone
