"""The cluster operator: a thin kopf layer that turns ImagePrefetches into NodeImageSet entries.

What this layer owns: reading ``ImagePrefetch`` objects, choosing nodes, writing each node's
``NodeImageSet.spec`` entries (merged with other prefetches'), copying pull secrets into the
operator namespace, aggregating the nodes' statuses back into ``ImagePrefetch.status``, Events,
TTL, and the node agents' DaemonSet.

Layout: pure functions that unit tests hit directly (:mod:`.prefetches` parses and validates a
spec, :mod:`.nodes` selects nodes, :mod:`.entries` builds and merges entries,
:mod:`.dispatching` plans which nodes to write, :mod:`.status` aggregates,
:mod:`.throttling`, :mod:`.secrets`, :mod:`.daemonsets`), small API functions
(:mod:`.kubeapi`), the per-prefetch reconcile step (:mod:`.reconciling`), and the kopf
handlers (:mod:`.handlers`) started by :mod:`.main`.

What it must not do: pull images (that is the node agent's job) or import :mod:`agent.node`.
It uses :mod:`agent.images` only for reference parsing, durations and digest resolution.
"""
