"""TypedDicts of the CRD bodies: the contract between operator and node agent.

``crds/*.yaml`` is the source of truth (with descriptions that ``kubectl explain`` shows);
these mirror it for type checking. Field names are the API's camelCase names.

NodeImageSet (cluster-scoped, named after its node):

- ``spec.images[]`` — written by the operator only. One :class:`ImageEntry` per image, keyed
  by ``name`` (:func:`agent.operator.entries.entry_name`: a readable slug of the reference
  plus a hash of it, stable across operators and restarts). ``image`` is the normalised
  reference as requested; ``digest`` the manifest digest the operator resolved (or the
  pinned digest): the agent pulls ``<repository>@<digest>`` when it is set, and resolves
  ``image`` itself when it is empty (registry unreachable from the operator). Several
  ImagePrefetches wanting the same image share one entry: ``owners`` lists them all;
  ``pullSecrets`` is the union of their secret copies; ``pullPolicy`` is Always if any owner
  says so; ``timeoutSeconds`` / ``backoffLimit`` / ``progressTimeout`` are the most lenient
  of the owners' (``progressTimeout`` "0" = disabled wins); ``pinned`` if any owner has
  ``completionPolicy: Never``; ``traceparent`` is the dispatching span of the owner that
  last changed the entry.
- ``status.images[]`` — written by the node agent only. One :class:`ImageStatus` per spec
  entry, same ``name``; an entry removed from the spec disappears from the status.
- ``status.agent`` — what the agent says about itself (:class:`AgentHeartbeat`: version,
  store capacity and free space), written when it changes. The heartbeat itself is a Lease
  per node (:mod:`agent.kube.leases`), renewed by the agent; the operator treats a node whose
  Lease it has not seen renewed for ``operator.agent_heartbeat_timeout`` as having no live
  agent. ``heartbeatTime`` is no longer written.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

PullPolicy = Literal["IfNotPresent", "Always"]
CompletionPolicy = Literal["Always", "Never"]
#: Per-image phase on a node; the values of :class:`agent.images.progress.events.Phase`.
ImagePhase = Literal[
    "Pending", "Resolving", "Downloading", "Unpacking", "Committing", "Ready", "Failed", "Stalled"
]
PrefetchPhase = Literal["Pending", "Progressing", "Complete", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(TypedDict):
    type: str
    status: ConditionStatus
    reason: NotRequired[str]
    message: NotRequired[str]
    lastTransitionTime: NotRequired[str]
    observedGeneration: NotRequired[int]


# ---------------------------------------------------------------------------- ImagePrefetch


class LabelRequirement(TypedDict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: NotRequired[list[str]]


class LabelSelector(TypedDict, total=False):
    matchLabels: dict[str, str]
    matchExpressions: list[LabelRequirement]


class SecretReference(TypedDict):
    name: str


class PrefetchSpec(TypedDict):
    images: list[str]
    nodeSelector: NotRequired[LabelSelector]
    nodeNames: NotRequired[list[str]]
    includeNotReadyNodes: NotRequired[bool]
    includeUnschedulableNodes: NotRequired[bool]
    imagePullSecrets: NotRequired[list[SecretReference]]
    pullPolicy: NotRequired[PullPolicy]
    parallelism: NotRequired[int]
    timeoutSeconds: NotRequired[int]
    progressTimeout: NotRequired[str]
    backoffLimit: NotRequired[int]
    completionPolicy: NotRequired[CompletionPolicy]
    ttlSecondsAfterFinished: NotRequired[int]


class NodeCounts(TypedDict):
    desired: int
    ready: int
    pulling: int
    pending: int
    failed: int
    agentUnavailable: int


class PrefetchSummary(TypedDict):
    images: int
    ready: str  # "2/3"
    progress: str  # "45%"


class ImageSummary(TypedDict):
    image: str
    resolved: str
    digest: str
    ready: int
    failed: int


class Failure(TypedDict):
    node: str
    image: str
    reason: str
    message: str


class PrefetchStatus(TypedDict, total=False):
    observedGeneration: int
    phase: PrefetchPhase
    summary: PrefetchSummary
    nodes: NodeCounts
    stalledCancellations: int
    bytesDone: int
    bytesTotal: int
    images: list[ImageSummary]
    failures: list[Failure]
    startTime: str
    completionTime: str
    conditions: list[Condition]


# ----------------------------------------------------------------------------- NodeImageSet


class Owner(TypedDict):
    namespace: str
    name: str
    uid: str


class ImageEntry(TypedDict):
    name: str
    image: str
    digest: NotRequired[str]
    owners: list[Owner]
    pullSecrets: NotRequired[list[str]]
    pullPolicy: NotRequired[PullPolicy]
    progressTimeout: NotRequired[str]
    timeoutSeconds: NotRequired[int]
    backoffLimit: NotRequired[int]
    pinned: NotRequired[bool]
    traceparent: NotRequired[str]


class NodeImageSetSpec(TypedDict, total=False):
    images: list[ImageEntry]


class ImageStatus(TypedDict):
    name: str
    phase: ImagePhase
    image: NotRequired[str]
    digest: NotRequired[str]
    bytesDone: NotRequired[int]
    bytesTotal: NotRequired[int]
    layersDone: NotRequired[int]
    layersTotal: NotRequired[int]
    attempts: NotRequired[int]
    stalls: NotRequired[int]
    stallCancellations: NotRequired[int]
    reason: NotRequired[str]
    message: NotRequired[str]
    startTime: NotRequired[str]
    completionTime: NotRequired[str]
    lastProgressTime: NotRequired[str]
    nextRetryTime: NotRequired[str]


class AgentHeartbeat(TypedDict, total=False):
    version: str
    storeCapacityBytes: int
    storeFreeBytes: int
    #: where the agent puts images (``agent.images.backends.RuntimeInfo.to_json()``)
    runtime: dict[str, str | bool]


class NodeImageSetSummary(TypedDict):
    images: int
    ready: int
    pulling: int
    failed: int


class NodeImageSetStatus(TypedDict, total=False):
    observedGeneration: int
    summary: NodeImageSetSummary
    agent: AgentHeartbeat
    images: list[ImageStatus]
    conditions: list[Condition]
