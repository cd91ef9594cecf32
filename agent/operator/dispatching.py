"""Per-node state of one ImagePrefetch, and which nodes to write next (parallelism)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from agent.kube import specs
from agent.operator import entries

FINAL_PHASES = frozenset({"Ready", "Failed", "Stalled"})
FAILED_PHASES = frozenset({"Failed", "Stalled"})

READY = "Ready"
FAILED = "Failed"
PULLING = "Pulling"
AGENT_UNAVAILABLE = "AgentUnavailable"


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """How one dispatched node is doing with one prefetch's images.

    ``images`` maps entry name → the node's current status for it, or None when the agent has
    not reported on (this version of) the entry yet.
    """

    node: str
    state: str  # READY, FAILED, PULLING or AGENT_UNAVAILABLE
    images: Mapping[str, specs.ImageStatus | None]
    #: seconds the node's agent has not been live (0: live)
    down_for: float = 0.0


def current_status(
    entry: specs.ImageEntry, statuses: Mapping[str, specs.ImageStatus]
) -> specs.ImageStatus | None:
    """The node's status for ``entry``, unless it describes another digest (stale)."""
    status = statuses.get(entry["name"])
    if status is None:
        return None
    wanted = entry.get("digest", "")
    got = status.get("digest", "")
    if wanted and got and got != wanted and status.get("phase") in FINAL_PHASES:
        return None  # a result for the previous digest; the new one is not reported yet
    return status


def statuses_by_name(node_status: Mapping[str, Any] | None) -> dict[str, specs.ImageStatus]:
    """A node's ``status.images`` by entry name."""
    return {s["name"]: s for s in (node_status or {}).get("images") or [] if "name" in s}


def report(
    node: str,
    wanted: Mapping[str, specs.ImageEntry],
    node_status: Mapping[str, Any] | None,
    agent_live: bool,
    statuses: Mapping[str, specs.ImageStatus] | None = None,
    dispatched_generation: int = 0,
    down_for: float = 0.0,
) -> NodeReport:
    """Fold a node's NodeImageSet status into a :class:`NodeReport` for our entries.

    ``statuses``: :func:`statuses_by_name` of ``node_status``, when the caller keeps it
    (the node's other owners' entries are then not looked at).
    ``dispatched_generation``: the NodeImageSet generation that carries our entries as they
    are; a status whose ``observedGeneration`` is older describes a previous version of them
    (results of the previous spec are not trusted: the node counts as pulling)."""
    observed = (node_status or {}).get("observedGeneration")
    if dispatched_generation and (not isinstance(observed, int)
                                  or observed < dispatched_generation):
        statuses = {}
    elif statuses is None:
        statuses = statuses_by_name(node_status)
    images = {name: current_status(entry, statuses) for name, entry in wanted.items()}
    phases = [s.get("phase") if s else None for s in images.values()]
    if phases and all(p == "Ready" for p in phases):
        state = READY
    elif phases and all(p in FINAL_PHASES for p in phases):
        state = FAILED
    elif not agent_live:
        state = AGENT_UNAVAILABLE
    else:
        state = PULLING
    return NodeReport(node, state, images, down_for)


def retrying(rep: NodeReport) -> bool:
    """Whether the node's agent will try a failed image of ours again (it said when)."""
    return any(st is not None and st.get("phase") in FAILED_PHASES and st.get("nextRetryTime")
               for st in rep.images.values())


def busy(rep: NodeReport, grace: float = float("inf")) -> bool:
    """Whether the node holds one of the ``parallelism`` slots: pulling, without a live
    agent for less than ``grace`` seconds, or failed with a retry to come."""
    if rep.state == AGENT_UNAVAILABLE:
        return rep.down_for < grace
    return rep.state == PULLING or (rep.state == FAILED and retrying(rep))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Nodes to write: ``dispatch`` (new), ``refresh`` (ours changed), ``withdraw`` (remove)."""

    dispatch: tuple[str, ...]
    refresh: tuple[str, ...]
    withdraw: tuple[str, ...]


def plan(
    targets: Iterable[str],
    dispatched: Mapping[str, Mapping[str, specs.ImageEntry]],
    desired: Mapping[str, specs.ImageEntry],
    reports: Mapping[str, NodeReport],
    parallelism: int | None,
    frozen: bool = False,
    known: Mapping[tuple[str, str], specs.ImageEntry] = {},
    grace: float = float("inf"),
) -> Plan:
    """Decide the writes of one reconcile.

    Args:
        targets: nodes the prefetch selects now.
        dispatched: node → our entries there (from the NodeImageSets).
        desired: entry name → our contribution (same on every node).
        reports: node → report, for dispatched nodes.
        parallelism: max nodes in flight (None = all): dispatched and :func:`busy`. A
            dispatched node without a live agent holds its slot (it is reported
            AgentUnavailable) for ``grace`` seconds, so agents that start late cannot
            overrun the limit and a dead one does not stall the rollout; so does a failed
            node whose agent will retry.
        frozen: the prefetch finished under completionPolicy Always: no new nodes.
        known: every prefetch's contributions (owners merged as the writer merges them).
        grace: seconds a node without a live agent keeps its slot.
    """
    target_set = set(targets)
    withdraw = sorted(node for node in dispatched if node not in target_set)
    # Entries only this prefetch owns (the usual case) are compared with what it alone
    # would write, computed once; shared entries get the full merge.
    owner = next((e["owners"][0]["uid"] for e in desired.values() if e.get("owners")), "")
    alone = {name: entries.combine([want]) for name, want in desired.items()}
    same: dict[int, bool] = {}  # id(entry) -> _same(entry, alone[name]): nodes share
    # their equal entries (index.Shared), so thousands of nodes cost a few comparisons

    def differs(ours: Mapping[str, specs.ImageEntry]) -> bool:
        if ours.keys() != desired.keys():
            return True
        for name, have in ours.items():
            owners = have.get("owners") or []
            if len(owners) != 1 or owners[0].get("uid") != owner:
                return _differs(ours, desired, known)
            alike = same.get(id(have))
            if alike is None:
                alike = same[id(have)] = _same(have, alone[name])
            if not alike:
                return True
        return False

    refresh = sorted(
        node for node, ours in dispatched.items() if node in target_set and differs(ours))
    dispatch: list[str] = []
    if not frozen:
        in_flight = sum(
            1 for node in dispatched
            if node in target_set and reports.get(node) is not None and busy(reports[node], grace)
        )
        room = len(target_set) if parallelism is None else max(parallelism - in_flight, 0)
        dispatch = sorted(node for node in target_set if node not in dispatched)[:room]
    return Plan(tuple(dispatch), tuple(refresh), tuple(withdraw))


#: Entry fields that do not need a write of their own (they follow the next real change).
_INCIDENTAL = frozenset({"traceparent"})


def _same(have: specs.ImageEntry, expected: specs.ImageEntry) -> bool:
    """Whether ``have`` is ``expected`` but for incidental fields (and for a digest
    ``expected`` lacks: an entry's digest is never replaced with nothing)."""
    for key, value in expected.items():
        if key not in _INCIDENTAL and have.get(key) != value:
            return False
    return all(key in expected or key in _INCIDENTAL or key == "digest" for key in have)


def _differs(ours: Mapping[str, specs.ImageEntry], desired: Mapping[str, specs.ImageEntry],
             known: Mapping[tuple[str, str], specs.ImageEntry]) -> bool:
    """Whether writing ``desired`` would change our entries on the node (any field: limits,
    policy, pinning, secrets, digest; another owner's digest in a shared entry stays the
    entry's one digest, see :func:`.entries.combine`)."""
    if set(ours) != set(desired):
        return True
    merged = {e["name"]: e for e in entries.upsert(list(ours.values()), desired.values(), known)}
    for name, have in ours.items():
        want = merged[name]
        if {k: v for k, v in want.items() if k not in _INCIDENTAL} != \
                {k: v for k, v in have.items() if k not in _INCIDENTAL}:
            return True
    return False
