"""Kubernetes names and body shapes shared by the operator and the node agent.

Never imported by :mod:`agent.images`. :mod:`.resources` holds the API group, plurals, label,
annotation and finalizer names; :mod:`.specs` the TypedDicts of the CRD bodies (the
contract between the operator, which writes ``NodeImageSet.spec``, and the node agent,
which writes ``NodeImageSet.status``). ``crds/*.yaml`` is the source of truth; these
mirror it.
"""

from agent.kube import resources, specs

__all__ = ["resources", "specs"]
