"""API group, resources, labels, annotations and finalizers of image-prefetcher."""

from __future__ import annotations

from typing import Final

GROUP: Final = "prefetcher.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

#: ImagePrefetch: namespaced, what users apply (short name ``ipf``).
PREFETCHES: Final = "imageprefetches"
PREFETCH_KIND: Final = "ImagePrefetch"
#: NodeImageSet: cluster-scoped, one per node, named after the node (short name ``nis``).
NODE_SETS: Final = "nodeimagesets"
NODE_SET_KIND: Final = "NodeImageSet"

#: The finalizer the operator puts on every ImagePrefetch to remove its NodeImageSet entries.
FINALIZER: Final = f"{GROUP}/node-entries"

#: Labels on everything the operator creates.
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "image-prefetcher-operator"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
#: Label of the pull-secret copies in the operator namespace (value: "pull-secret").
COMPONENT_PULL_SECRET: Final = "pull-secret"
#: Label of the agents' DaemonSet and its pods (value: "agent").
COMPONENT_AGENT: Final = "agent"
LABEL_NAME: Final = "app.kubernetes.io/name"
NAME: Final = "image-prefetcher"

#: On a secret copy: ``<namespace>/<name>`` of the source Secret.
ANNOTATION_SOURCE: Final = f"{GROUP}/source"
#: On a secret copy: the source Secret's resourceVersion copied last (refresh detection).
ANNOTATION_SOURCE_VERSION: Final = f"{GROUP}/source-resource-version"
#: On a secret copy: JSON list of ImagePrefetch UIDs that use it (deleted when empty).
ANNOTATION_USERS: Final = f"{GROUP}/used-by"
#: On the agents' DaemonSet: hash of the settings file it was made from (roll detection).
ANNOTATION_TEMPLATE_HASH: Final = f"{GROUP}/template-hash"

#: Where kopf keeps its handler progress and diff-base (annotations: the CRD schemas are
#: structural, so the API server would prune kopf's default ``status.kopf`` field).
KOPF_ANNOTATION_PREFIX: Final = f"kopf.{GROUP}"
