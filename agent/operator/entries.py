"""NodeImageSet ``spec.images[]`` entries: naming, building, merging over owners, releasing.

An entry is shared by every ImagePrefetch that wants the same (normalised) reference on a
node. Each owner *contributes* an entry of its own (:func:`contribution`); the entry written
is their combination (:func:`combine`): pull secrets united, ``pullPolicy`` Always if any
owner says so, the most lenient ``timeoutSeconds`` / ``backoffLimit`` / ``progressTimeout``
("0", disabled, is the most lenient), ``pinned`` if any owner pins, ``traceparent`` of the
owner writing now, and one deterministic ``digest``: the entry's current digest as long as
some owner still contributes it, otherwise the writer's (two prefetches that resolved a tag
to different digests thus do not take turns rewriting the entry and restarting the pulls;
every owner accepts the entry's digest). Contributions of owners the writer does not know
(another prefetch not reconciled yet since a restart) are taken from the entry as it stands.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping

from agent.images import durations, references
from agent.kube import specs
from agent.operator import prefetches

_SLUG = re.compile(r"[^a-z0-9]+")


def entry_name(ref: references.Reference) -> str:
    """``nginx-1-27-3f2a…``: a DNS label from the repository's last part and tag, plus a hash.

    Stable for the same normalised reference, so operator restarts and several prefetches
    agree on it.
    """
    normal = str(ref)
    last = ref.path.rsplit("/", 1)[-1]
    slug = _SLUG.sub("-", f"{last}-{ref.tag}".lower()).strip("-")[:40].strip("-") or "image"
    return f"{slug}-{hashlib.sha256(normal.encode()).hexdigest()[:12]}"


def contribution(
    prefetch: prefetches.Prefetch,
    ref: references.Reference,
    digest: str,
    secret_copies: Iterable[str],
    traceparent: str,
) -> specs.ImageEntry:
    """The entry one prefetch alone would write for one image."""
    entry: specs.ImageEntry = {
        "name": entry_name(ref),
        "image": str(ref),
        "owners": [prefetch.owner],
        "pullPolicy": prefetch.pull_policy,
        "backoffLimit": prefetch.backoff_limit,
        "pinned": prefetch.completion_policy == "Never",
    }
    if digest:
        entry["digest"] = digest
    copies = sorted(set(secret_copies))
    if copies:
        entry["pullSecrets"] = copies
    if prefetch.timeout_seconds is not None:
        entry["timeoutSeconds"] = prefetch.timeout_seconds
    if prefetch.progress_timeout is not None:
        entry["progressTimeout"] = prefetch.progress_timeout
    if traceparent:
        entry["traceparent"] = traceparent
    return entry


def _progress_key(value: str | None) -> float:
    if value is None:
        return -1.0  # absent: the agent's default; anything explicit is at least as lenient
    seconds = durations.parse(value)
    return float("inf") if seconds == 0 else seconds


def combine(contributions: list[specs.ImageEntry], current: str = "") -> specs.ImageEntry:
    """One entry from the owners' contributions; the first contribution is the writer's.

    ``current``: the digest of the entry as it stands (kept while an owner contributes it).
    """
    first = contributions[0]
    owners: dict[str, specs.Owner] = {}
    for c in contributions:
        for owner in c["owners"]:
            owners.setdefault(owner["uid"], owner)
    result: specs.ImageEntry = {
        "name": first["name"],
        "image": first["image"],
        "owners": sorted(owners.values(), key=lambda o: (o["namespace"], o["name"], o["uid"])),
        "pullPolicy": "Always"
        if any(c.get("pullPolicy") == "Always" for c in contributions)
        else "IfNotPresent",
        "backoffLimit": max(c.get("backoffLimit", prefetches.DEFAULT_BACKOFF_LIMIT)
                            for c in contributions),
        "pinned": any(c.get("pinned", False) for c in contributions),
    }
    digests = {c.get("digest", "") for c in contributions}
    digest = current if current and current in digests else first.get("digest", "")
    if not digest:  # the writer has none (not resolved): keep another owner's, or the
        # entry's own (a digest is never replaced with nothing: a registry blip at the
        # operator must not make nodes resolve, and maybe pull, the tag again)
        digest = next((c["digest"] for c in contributions if c.get("digest")), current)
    if digest:
        result["digest"] = digest
    secrets = sorted({s for c in contributions for s in c.get("pullSecrets", [])})
    if secrets:
        result["pullSecrets"] = secrets
    timeouts = [c.get("timeoutSeconds") for c in contributions]
    if all(t is not None for t in timeouts):  # an owner without a limit means no limit
        result["timeoutSeconds"] = max(t for t in timeouts if t is not None)
    progress = [c.get("progressTimeout") for c in contributions]
    if all(p is not None for p in progress):
        result["progressTimeout"] = str(max(progress, key=_progress_key))
    if first.get("traceparent"):
        result["traceparent"] = first["traceparent"]
    return result


def _others(existing: specs.ImageEntry, uid: str,
            known: Mapping[tuple[str, str], specs.ImageEntry]) -> list[specs.ImageEntry]:
    out: list[specs.ImageEntry] = []
    for owner in existing["owners"]:
        if owner["uid"] == uid:
            continue
        theirs = known.get((owner["uid"], existing["name"]))
        if theirs is None:
            theirs = copy.deepcopy(existing)
            theirs["owners"] = [owner]
        out.append(theirs)
    return out


def upsert(
    entries: list[specs.ImageEntry],
    ours: Iterable[specs.ImageEntry],
    known: Mapping[tuple[str, str], specs.ImageEntry] = {},
) -> list[specs.ImageEntry]:
    """``entries`` with our contributions merged in (a new list, sorted by name)."""
    by_name = {e["name"]: e for e in entries}
    for mine in ours:
        uid = mine["owners"][0]["uid"]
        existing = by_name.get(mine["name"])
        others = _others(existing, uid, known) if existing is not None else []
        current = existing.get("digest", "") if existing is not None else ""
        by_name[mine["name"]] = combine([mine, *others], current)
    return [by_name[name] for name in sorted(by_name)]


def release(
    entries: list[specs.ImageEntry],
    uid: str,
    keep: set[str] | frozenset[str] = frozenset(),
    known: Mapping[tuple[str, str], specs.ImageEntry] = {},
) -> list[specs.ImageEntry]:
    """``entries`` without owner ``uid`` except in entries named in ``keep``.

    Entries left without owners are dropped (their images become garbage for the agent).
    """
    out: list[specs.ImageEntry] = []
    for entry in entries:
        if entry["name"] in keep or all(o["uid"] != uid for o in entry["owners"]):
            out.append(entry)
            continue
        others = _others(entry, uid, known)
        if others:
            out.append(combine(others, entry.get("digest", "")))
    return out


def owned(entries: Iterable[specs.ImageEntry], uid: str) -> dict[str, specs.ImageEntry]:
    """The entries ``uid`` is an owner of, by name."""
    return {e["name"]: e for e in entries if any(o["uid"] == uid for o in e["owners"])}
