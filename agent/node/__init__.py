"""The node agent: a thin kopf layer that pulls what the operator dispatched to this node.

What this layer owns: watching **only its own** ``NodeImageSet`` (server-side
``fieldSelector=metadata.name=<node>``, kopf standalone), deciding which entries to pull,
cancel or report as present, driving :class:`agent.images.service.ImageService` with each
entry's limits and pull-secret credentials, writing ``NodeImageSet.status`` (throttled, plus
the heartbeat), Kubernetes Events, garbage collection with a disk budget, and the
``/healthz`` / ``/readyz`` endpoints.

Layout: pure decisions that unit tests hit directly (:mod:`.reconciling`: entries, plans,
backoff, budget, status documents), the throttled status writer (:mod:`.reporting`), the
few API calls (:mod:`.kubeapi`), pull-secret keychains (:mod:`.credentials`), GC and disk
checks (:mod:`.collecting`), one entry's attempt series (:mod:`.pulling`), the loop that
starts and stops those (:mod:`.supervising`), the heartbeat Lease renewals and what their
failures log (:mod:`.heartbeating`), error mapping (:mod:`.errors`), health
(:mod:`.health`), the kopf handlers (:mod:`.handlers`) and the entry point (:mod:`.main`).

What it must not do: write ``spec`` of anything, read secrets outside the operator
namespace, watch other nodes' objects, import :mod:`agent.operator`, or do HTTP, hashing,
tar or file work that belongs to :mod:`agent.images`.
"""
