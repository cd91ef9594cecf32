"""The node agents' DaemonSet: kept as the file the chart renders says (operator.agent_daemonset).

The chart renders the DaemonSet as an ordinary object (Helm, or a GitOps tool, creates,
upgrades and deletes it) and the same manifest into a ConfigMap the operator mounts: that copy
is what the operator heals from. Who owns what:

- Helm owns the object and all of its content. The operator never writes a field the chart
  does not render, except an ownerReference to the ConfigMap on a DaemonSet it had to create
  itself (so that ``helm uninstall``, which deletes the ConfigMap, takes it along).
- The operator puts the DaemonSet back when it is deleted, and reverts edits of ``spec``, of
  the chart's labels and of its own annotations made outside Helm; server defaults and
  fields nobody rendered (``kubectl rollout restart``'s annotation, for one) are not drift.

Two operators with different copies (an operator upgrade, or kubelet refreshing one pod's
ConfigMap volume before the other's) must not take turns overwriting each other. Every
manifest carries ``prefetcher.dev/template-hash`` (the chart's hash of the spec, or ours of
the file) and ``prefetcher.dev/template-revision`` (the Helm release revision; absent = 0). A
live DaemonSet with another hash is replaced only by a strictly newer revision, or when
neither has a revision (a hand-written file that changed); one with the same hash is only
repaired. Quantities are compared by value (``cpu: 0.5`` is ``500m``), as the API server
stores them canonicalised.

The keeper also reads the DaemonSet's status: nodes where the DaemonSet controller could not
create an agent pod (a priority class quota, a pod security level, a webhook) are reported as
a Warning Event on the DaemonSet and in the log.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.kube import resources
from agent.operator import errors, event_series, kubeapi

logger = logging.getLogger("agent.operator")

JSON = dict[str, Any]
#: On the DaemonSet and its copy: the Helm release revision it was rendered for.
ANNOTATION_REVISION = f"{resources.GROUP}/template-revision"
#: Keys whose values are resource quantities (compared by value, not by spelling).
QUANTITY_MAPS = frozenset({"requests", "limits", "overhead"})
QUANTITY_KEYS = frozenset({"sizeLimit"})

Action = Literal["create", "repair", "replace", "keep", "newer"]


class InvalidTemplate(ValueError):
    """The DaemonSet file cannot be used; the message names the file and the problem."""


def load(path: str | Path) -> dict[str, Any]:
    """Read and check the DaemonSet manifest file."""
    p = Path(path)
    try:
        body = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidTemplate(f"{p}: cannot read the agent DaemonSet: {e}") from e
    if not isinstance(body, dict) or body.get("kind") != "DaemonSet":
        raise InvalidTemplate(f"{p}: expected a DaemonSet manifest (kind: DaemonSet)")
    if not (body.get("metadata") or {}).get("name"):
        raise InvalidTemplate(f"{p}: metadata.name is required")
    if not ((body.get("spec") or {}).get("template") or {}).get("spec"):
        raise InvalidTemplate(f"{p}: spec.template.spec is required")
    if revision(body) < 0:
        raise InvalidTemplate(f"{p}: metadata.annotations.{ANNOTATION_REVISION} must be a "
                              "non-negative integer")
    return body


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def _annotations(body: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return ((body or {}).get("metadata") or {}).get("annotations") or {}


def stamp(body: Mapping[str, Any] | None) -> str:
    """The template hash a DaemonSet (or its manifest) carries; "" = none."""
    return str(_annotations(body).get(resources.ANNOTATION_TEMPLATE_HASH) or "")


def revision(body: Mapping[str, Any] | None) -> int:
    """The release revision a DaemonSet (or its manifest) was rendered for; 0 = none, -1 =
    not a number."""
    raw = str(_annotations(body).get(ANNOTATION_REVISION) or "0").strip()
    return int(raw) if raw.isdigit() else -1


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A non-controlling ownerReference to ``owner`` (the chart's ConfigMap): the garbage
    collector deletes the DaemonSet once the owner is gone, and never waits on it."""
    meta = owner.get("metadata") or {}
    return {"apiVersion": owner.get("apiVersion", "v1"), "kind": owner.get("kind", "ConfigMap"),
            "name": meta["name"], "uid": meta["uid"], "controller": False,
            "blockOwnerDeletion": False}


def desired(template: Mapping[str, Any], namespace: str,
            owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DaemonSet to keep in ``namespace``: the manifest, with our labels where it has none
    (the chart's own ``app.kubernetes.io/managed-by: Helm`` stays: Helm checks it), its hash
    (the manifest's own, else ours of the file), and an ownerReference to ``owner`` when
    given (used only when the DaemonSet has to be created)."""
    body = copy.deepcopy(dict(template))
    body.setdefault("apiVersion", "apps/v1")
    body.setdefault("kind", "DaemonSet")
    meta = body.setdefault("metadata", {})
    meta["namespace"] = namespace
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        meta.pop(key, None)
    labels = meta.setdefault("labels", {})
    labels.setdefault(resources.LABEL_MANAGED_BY, resources.MANAGED_BY)
    labels.setdefault(resources.LABEL_COMPONENT, resources.COMPONENT_AGENT)
    annotations = meta.setdefault("annotations", {})
    annotations[resources.ANNOTATION_TEMPLATE_HASH] = stamp(template) or template_hash(template)
    meta.pop("ownerReferences", None)
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    body.pop("status", None)
    return body


def decide(live: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> Action:
    """What to do with the live DaemonSet (None = missing) given the one we want."""
    if live is None:
        return "create"
    if stamp(live) == stamp(wanted):
        return "repair" if drifted(live, wanted) else "keep"
    mine, theirs = revision(wanted), revision(live)
    if mine > theirs or mine == theirs == 0:
        return "replace"
    return "newer"  # a newer release (or another operator's newer copy): not ours to undo


def merged(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The live DaemonSet with the wanted spec, labels and annotations: what others put in
    its metadata (Helm's release annotations, a GitOps tool's tracking label, owners) stays."""
    body = copy.deepcopy(dict(live))
    body.pop("status", None)
    meta = body.setdefault("metadata", {})
    want_meta = wanted.get("metadata") or {}
    for key in ("labels", "annotations"):
        meta[key] = {**(meta.get(key) or {}), **(want_meta.get(key) or {})}
    if revision(live) > revision(wanted):  # never lower it (see decide)
        meta["annotations"][ANNOTATION_REVISION] = str(revision(live))
    body["spec"] = copy.deepcopy(wanted.get("spec"))
    return body


def drifted(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the live DaemonSet differs from what we want: the wanted labels and
    annotations (our hash among them; a higher revision is not drift), and the wanted spec
    (extra fields of the live one, such as server defaults, are not drift; quantities
    compare by value)."""
    live_meta = live.get("metadata") or {}
    want_meta = wanted.get("metadata") or {}
    for key in ("labels", "annotations"):
        have = live_meta.get(key) or {}
        if any(have.get(k) != v for k, v in (want_meta.get(key) or {}).items()
               if k != ANNOTATION_REVISION):
            return True
    return _subset(canonical(wanted.get("spec")), canonical(live.get("spec")))


def _subset(want: Any, have: Any) -> bool:
    """True if ``want`` is NOT contained in ``have`` (server defaults may add fields)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return True
        return any(_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return True
        return any(_subset(w, h) for w, h in zip(want, have, strict=True))
    return bool(want != have)


# ------------------------------------------------------------------------------ quantities

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|"
                       r"n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX: dict[str, decimal.Decimal] = {
    "": decimal.Decimal(1), "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"),
    "m": decimal.Decimal("1e-3"),
    **{s: decimal.Decimal(10) ** (3 * i) for i, s in enumerate("kMGTPE", 1)},
    **{f"{s}i": decimal.Decimal(2) ** (10 * i) for i, s in enumerate("KMGTPE", 1)},
}


def quantity(value: Any) -> decimal.Decimal | None:
    """A Kubernetes resource quantity's value (``"500m"``, ``0.5``, ``"1Gi"``, ``"1e3"``);
    None if ``value`` is not one."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        return None
    number, exponent, suffix = match.groups()
    amount = decimal.Decimal(number)
    if exponent:
        return amount.scaleb(int(exponent[1:]))
    return amount * _SUFFIX[suffix or ""]


def canonical(value: Any, key: str = "") -> Any:
    """``value`` with every resource quantity replaced by its numeric value."""
    if isinstance(value, Mapping):
        if key in QUANTITY_MAPS:
            return {k: _as_quantity(v) for k, v in value.items()}
        return {k: canonical(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if key in QUANTITY_KEYS:
        return _as_quantity(value)
    return value


def _as_quantity(value: Any) -> Any:
    parsed = quantity(value)
    return value if parsed is None else parsed


# ------------------------------------------------------------------------------ pods, status


def ready_nodes(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    """Nodes where an agent pod is Running and Ready."""
    out: set[str] = set()
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        if node and status.get("phase") == "Running" and ready:
            out.add(node)
    return out


def missing_pods(live: Mapping[str, Any]) -> str:
    """What the DaemonSet's status says about nodes without an agent pod ("" = none): the
    DaemonSet controller could not create them (its FailedCreate Events say why)."""
    status = live.get("status") or {}
    meta = live.get("metadata") or {}
    if status.get("observedGeneration", meta.get("generation")) != meta.get("generation"):
        return ""  # the controller has not looked at the current spec yet
    desired_count = int(status.get("desiredNumberScheduled") or 0)
    current = int(status.get("currentNumberScheduled") or 0)
    if current >= desired_count:
        return ""
    unavailable = int(status.get("numberUnavailable") or 0)
    return (f"{desired_count - current} of {desired_count} nodes have no agent pod (desired"
            f" {desired_count}, current {current}, unavailable {unavailable}): the DaemonSet"
            " controller cannot create them; its FailedCreate events say why (kubectl"
            f" describe daemonset -n {meta.get('namespace', '')} {meta.get('name', '')})")


# ------------------------------------------------------------------------------ keeper


@dataclasses.dataclass
class Keeper:
    """Keeps the agents' DaemonSet (one :meth:`check` per daemonset_check_interval)."""

    client: kubeapi.Client
    namespace: str
    path: str
    owner_name: str = ""
    #: The owner ConfigMap was missing at the last check (logged once).
    owner_missing: bool = False
    #: The last problem reported about missing agent pods ("" = none).
    reported: str = ""
    #: The DaemonSet as last read or written (what schedules the agents; None = none kept).
    live: JSON | None = None
    #: Posts the Events (a repeated reason patches its Event); None: one Event each.
    recorder: event_series.EventRecorder | None = None

    async def check(self) -> set[str] | None:
        """Keep the DaemonSet; return the nodes with a ready agent (None: no DaemonSet kept)."""
        if not self.path:
            return None
        owner = None
        if self.owner_name:
            owner = await self.client.get(kubeapi.configmap_path(self.namespace, self.owner_name))
            if owner is None or (owner.get("metadata") or {}).get("deletionTimestamp"):
                # Uninstalling: Helm (or the garbage collector) removes the DaemonSet.
                if not self.owner_missing:
                    logger.warning(f"ConfigMap {self.namespace}/{self.owner_name} (the agent"
                                   " DaemonSet's copy) does not exist; not keeping the DaemonSet")
                self.owner_missing = True
                self.live = None
                return None
            self.owner_missing = False
        wanted = desired(load(self.path), self.namespace, owner)
        name = wanted["metadata"]["name"]
        live = await self.client.get(kubeapi.daemonset_path(self.namespace, name))
        action = decide(live, wanted)
        where = f"{self.namespace}/{name}"
        if action == "create":
            live = await self.client.create(kubeapi.daemonset_path(self.namespace), wanted)
            logger.info(f"created the agent DaemonSet {where}")
        elif action in ("repair", "replace"):
            assert live is not None
            body = merged(live, wanted)
            live = await self.client.replace(kubeapi.daemonset_path(self.namespace, name), body)
            logger.info(f"restored the agent DaemonSet {where} to its manifest" if action ==
                        "repair" else f"updated the agent DaemonSet {where} to revision"
                        f" {revision(wanted)} (hash {stamp(wanted)})")
        elif action == "newer":
            assert live is not None
            logger.debug(f"the agent DaemonSet {where} is at revision {revision(live)}, newer"
                         f" than this operator's copy ({revision(wanted)}); left as it is")
        self.live = live
        await self.report(live)
        selector = (wanted.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = await self.client.list(kubeapi.pods_path(self.namespace),
                                      labelSelector=label_selector)
        return ready_nodes(pods)

    async def report(self, live: Mapping[str, Any] | None) -> None:
        """A Warning Event on the DaemonSet when nodes have no agent pod, a Normal one when
        that is over; once per change, not once per check."""
        problem = missing_pods(live) if live else ""
        if problem == self.reported:
            return
        recovered = bool(self.reported) and not problem
        self.reported = problem
        if not problem and not recovered:
            return
        assert live is not None
        if problem:
            logger.warning(f"agent DaemonSet: {problem}")
        else:
            logger.info("agent DaemonSet: every node it targets has an agent pod again")
        kind = "Warning" if problem else "Normal"
        reason = "AgentPodsMissing" if problem else "AgentPodsScheduled"
        message = problem or "every node the DaemonSet targets has an agent pod"
        if self.recorder is not None:
            self.recorder.record({"apiVersion": "apps/v1", "kind": "DaemonSet", **live},
                                 kind, reason, message)
            return
        try:
            await self.client.create(f"/api/v1/namespaces/{self.namespace}/events",
                                     event(live, kind, reason, message))
        except errors.APIError as e:
            logger.warning(f"cannot post an Event about the agent DaemonSet: {e}")


def event(live: Mapping[str, Any], kind: str, reason: str, message: str) -> JSON:
    """A core/v1 Event about the DaemonSet ``live``."""
    meta = live.get("metadata") or {}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = meta.get("name", "")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": meta.get("namespace", "")},
        "involvedObject": {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": name,
                           "namespace": meta.get("namespace", ""), "uid": meta.get("uid", "")},
        "type": kind, "reason": reason, "message": message[:1024],
        "source": {"component": "image-prefetcher-operator"},
        "reportingComponent": "image-prefetcher-operator",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
