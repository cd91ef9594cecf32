"""An ImagePrefetch spec, parsed and validated beyond what the CRD schema can check."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agent.images import durations, errors, references
from agent.kube import specs
from agent.operator.errors import InvalidSpec

DEFAULT_BACKOFF_LIMIT = 3
_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` term."""

    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """A validated ImagePrefetch: what the operator works from.

    Attributes:
        images: ``(as written, parsed)`` per spec.images entry, in spec order.
        match_labels / match_expressions: the node selector (both empty = every node).
        node_names: if not None, only these nodes.
        parallelism: max nodes in flight; None = no limit.
    """

    namespace: str
    name: str
    uid: str
    generation: int
    images: tuple[tuple[str, references.Reference], ...]
    match_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()
    node_names: frozenset[str] | None = None
    include_not_ready: bool = False
    include_unschedulable: bool = False
    pull_secrets: tuple[str, ...] = ()
    pull_policy: specs.PullPolicy = "IfNotPresent"
    parallelism: int | None = None
    timeout_seconds: int | None = None
    progress_timeout: str | None = None
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    completion_policy: specs.CompletionPolicy = "Always"
    ttl_seconds_after_finished: int | None = None

    @property
    def owner(self) -> specs.Owner:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid}

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _int(spec: Mapping[str, Any], field: str, minimum: int) -> int | None:
    value = spec.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"spec.{field}", f"must be an integer, not {value!r}")
    if value < minimum:
        raise InvalidSpec(f"spec.{field}", f"must be at least {minimum}, not {value}")
    return value


def _enum(spec: Mapping[str, Any], field: str, allowed: tuple[str, ...], default: str) -> str:
    value = spec.get(field, default)
    if value not in allowed:
        raise InvalidSpec(f"spec.{field}", f"must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def parse(body: Mapping[str, Any]) -> Prefetch:
    """Validate an ImagePrefetch body; raise :class:`InvalidSpec` naming the field."""
    meta = body.get("metadata") or {}
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidSpec("spec", "is required")
    raw_images = spec.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise InvalidSpec("spec.images", "must list at least one image reference")
    images: list[tuple[str, references.Reference]] = []
    seen: dict[str, int] = {}
    for i, text in enumerate(raw_images):
        if not isinstance(text, str):
            raise InvalidSpec(f"spec.images[{i}]", f"must be a string, not {text!r}")
        try:
            ref = references.parse(text)
        except errors.InvalidReference as e:
            raise InvalidSpec(f"spec.images[{i}]", str(e)) from e
        normal = str(ref)
        if normal in seen:
            raise InvalidSpec(
                f"spec.images[{i}]", f"{text!r} is the same image as spec.images[{seen[normal]}]"
            )
        seen[normal] = i
        images.append((text, ref))

    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping):
        raise InvalidSpec("spec.nodeSelector", "must be a label selector object")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidSpec("spec.nodeSelector.matchLabels", "must map label keys to values")
    requirements: list[Requirement] = []
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        where = f"spec.nodeSelector.matchExpressions[{i}]"
        if not isinstance(expr, Mapping) or not expr.get("key"):
            raise InvalidSpec(where, "needs a key and an operator")
        op = expr.get("operator")
        values = tuple(str(v) for v in expr.get("values") or ())
        if op not in _OPERATORS:
            raise InvalidSpec(f"{where}.operator",
                              f"must be In, NotIn, Exists or DoesNotExist, not {op!r}")
        if op in ("In", "NotIn") and not values:
            raise InvalidSpec(f"{where}.values", f"must not be empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise InvalidSpec(f"{where}.values", f"must be empty for {op}")
        requirements.append(Requirement(str(expr["key"]), str(op), values))

    names = spec.get("nodeNames")
    node_names = frozenset(str(n) for n in names) if names else None

    progress = spec.get("progressTimeout")
    if progress is not None:
        try:
            durations.parse(str(progress))
        except ValueError as e:
            raise InvalidSpec("spec.progressTimeout", str(e)) from e
        progress = str(progress)

    secrets: list[str] = []
    for i, ref in enumerate(spec.get("imagePullSecrets") or []):
        if not isinstance(ref, Mapping) or not ref.get("name"):
            raise InvalidSpec(f"spec.imagePullSecrets[{i}].name", "is required")
        secrets.append(str(ref["name"]))

    completion = _enum(spec, "completionPolicy", ("Always", "Never"), "Always")
    ttl = _int(spec, "ttlSecondsAfterFinished", 0)
    if ttl is not None and completion == "Never":
        raise InvalidSpec(
            "spec.ttlSecondsAfterFinished",
            "cannot be used with completionPolicy Never: such a prefetch never finishes",
        )
    backoff = _int(spec, "backoffLimit", 0)
    return Prefetch(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        images=tuple(images),
        match_labels={str(k): str(v) for k, v in labels.items()},
        match_expressions=tuple(requirements),
        node_names=node_names,
        include_not_ready=bool(spec.get("includeNotReadyNodes", False)),
        include_unschedulable=bool(spec.get("includeUnschedulableNodes", False)),
        pull_secrets=tuple(dict.fromkeys(secrets)),
        pull_policy=_enum(spec, "pullPolicy", ("IfNotPresent", "Always"), "IfNotPresent"),  # type: ignore[arg-type]
        parallelism=_int(spec, "parallelism", 1),
        timeout_seconds=_int(spec, "timeoutSeconds", 1),
        progress_timeout=progress,
        backoff_limit=DEFAULT_BACKOFF_LIMIT if backoff is None else backoff,
        completion_policy=completion,  # type: ignore[arg-type]
        ttl_seconds_after_finished=ttl,
    )
