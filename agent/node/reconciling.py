"""Pure decisions of the node agent: entries, what to start or cancel, backoff, disk budget,
garbage, and the status documents. No I/O here; :mod:`.supervising` acts on the answers.

Vocabulary: an *entry* is one ``spec.images[]`` item (:class:`Entry`); an *attempt series*
is what one entry version gets: attempts with exponential backoff, up to ``backoffLimit``
retries, within ``timeoutSeconds``; it ends as an :class:`Outcome` (Ready or Failed).
An entry's :attr:`Entry.key` names its version: a series whose key no longer matches the
spec is cancelled and a new one started.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from agent.images import bytesizes, durations, references
from agent.images.progress import events
from agent.kube import specs

#: Label on the image records the agent writes; its GC removes only records carrying it.
LABEL_MANAGED = "prefetcher.dev/managed-by"
MANAGED_BY = "node-agent"
#: Label with the entry name that pulled the record (for people; GC goes by reference).
LABEL_ENTRY = "prefetcher.dev/entry"
#: The reference as the ImagePrefetch named it (a tag, usually), normalised: an image the
#: agent pulled by digest is still "nginx:1.27" for images.pinned_images.
LABEL_IMAGE = "prefetcher.dev/image"

DEFAULT_BACKOFF_LIMIT = 3
#: A pull's disk budget is checked again each time it wrote this much more (blobs and
#: unpacked layers), so one that unpacks past the budget stops within this of it.
BUDGET_CHECK_BYTES = 64 * 1024 * 1024

#: Longest ``status.images[].message`` (the CRD's maxLength): the status stays bounded.
MAX_MESSAGE = 512

PULLING_PHASES = frozenset({"Pending", "Resolving", "Downloading", "Unpacking", "Committing"})
FAILED_PHASES = frozenset({"Failed", "Stalled"})


def timestamp(when: datetime.datetime | None = None) -> str:
    """RFC 3339 UTC with seconds, as Kubernetes writes times."""
    when = when or datetime.datetime.now(datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ``spec.images[]`` entry, with defaults applied and the reference to pull.

    ``progress_timeout`` is seconds (0 disables), or None for the agent's configured
    default; ``timeout_seconds`` None means no limit.
    """

    name: str
    image: str
    digest: str = ""
    pull_secrets: tuple[str, ...] = ()
    pull_policy: str = "IfNotPresent"
    progress_timeout: float | None = None
    timeout_seconds: float | None = None
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    pinned: bool = False
    traceparent: str = ""
    owners: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """What is pulled: ``<repository>@<digest>`` when the operator resolved a digest,
        else the normalised ``image`` (the agent resolves the tag)."""
        if not self.digest:
            return self.image
        try:
            return f"{references.parse(self.image).name}@{self.digest}"
        except Exception:  # an invalid image: let the pull report InvalidReference
            return self.image

    @property
    def key(self) -> tuple[Any, ...]:
        """The entry's version: a change restarts its attempt series."""
        return (self.reference, self.pull_secrets, self.pull_policy, self.progress_timeout,
                self.timeout_seconds, self.backoff_limit)

    @property
    def keep_present(self) -> bool:
        """Whether a Ready image that disappeared from the store is pulled again
        (``pinned``: completionPolicy Never)."""
        return self.pinned


def parse_entry(raw: Mapping[str, Any]) -> Entry:
    """An :class:`Entry` from a ``spec.images[]`` item (the CRD schema validated it)."""
    progress: float | None = None
    if raw.get("progressTimeout") not in (None, ""):
        try:
            progress = durations.parse(str(raw["progressTimeout"]))
        except ValueError:
            progress = None
    timeout = raw.get("timeoutSeconds")
    limit = raw.get("backoffLimit")
    return Entry(
        name=str(raw["name"]),
        image=str(raw.get("image", "")),
        digest=str(raw.get("digest") or ""),
        pull_secrets=tuple(sorted(set(raw.get("pullSecrets") or []))),
        pull_policy=str(raw.get("pullPolicy") or "IfNotPresent"),
        progress_timeout=progress,
        timeout_seconds=float(timeout) if timeout else None,
        backoff_limit=int(limit) if limit is not None else DEFAULT_BACKOFF_LIMIT,
        pinned=bool(raw.get("pinned", False)),
        traceparent=str(raw.get("traceparent") or ""),
        owners=tuple(f"{o.get('namespace')}/{o.get('name')}" for o in raw.get("owners") or []),
    )


def parse_entries(spec: Mapping[str, Any] | None) -> dict[str, Entry]:
    """Entries by name from a NodeImageSet ``spec`` (nameless items are skipped)."""
    out: dict[str, Entry] = {}
    for raw in (spec or {}).get("images") or []:
        if isinstance(raw, Mapping) and raw.get("name"):
            entry = parse_entry(raw)
            out[entry.name] = entry
    return out


# ------------------------------------------------------------------------------------ plans


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an entry's last attempt series ended: Ready, or Failed with ``reason``."""

    key: tuple[Any, ...]
    ready: bool
    reason: str = ""
    at: float = 0.0  # the supervisor's clock
    #: consecutive failed series of this entry version (1 for the first)
    failures: int = 1
    #: this entry's own jitter factor for the series backoff, in [1 - JITTER, 1 + JITTER]
    jitter: float = 1.0

    def after(self, previous: Outcome | None) -> Outcome:
        """This outcome, counting the failed series before it (same entry version)."""
        if self.ready or previous is None or previous.ready or previous.key != self.key:
            return self
        return dataclasses.replace(self, failures=previous.failures + 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one reconcile does: series to ``start`` and to ``cancel`` (entry names), and
    when to look again (``wake_in`` seconds, or None for the resync interval)."""

    start: tuple[str, ...] = ()
    cancel: tuple[str, ...] = ()
    wake_in: float | None = None


def plan(
    wanted: Mapping[str, Entry],
    running: Mapping[str, tuple[Any, ...]],
    outcomes: Mapping[str, Outcome],
    present: set[str],
    *,
    now: float,
    failed_retry_interval: float,
    hopeless: Iterable[str] = (),
    permanent: Iterable[str] = (),
) -> Plan:
    """Decide which attempt series to start and cancel.

    Args:
        wanted: the spec's entries by name.
        running: entry name → key of its running series.
        outcomes: entry name → how its last series ended.
        present: references whose images are in the store, unpacked.
        now: the clock ``outcomes[].at`` is on.
        failed_retry_interval: seconds after which a Failed series is tried again
            (0: never), doubling with every failed series of the entry version (capped at
            :data:`SERIES_BACKOFF_CAP` times it), spread by each outcome's jitter so nodes
            do not retry in lock-step; never when its reason is in ``hopeless``, and, when
            it is in ``permanent``, not after ``backoffLimit`` failed series.
    """
    hopeless = set(hopeless)
    permanent = set(permanent)
    cancel = [name for name, key in running.items()
              if name not in wanted or wanted[name].key != key]
    start: list[str] = []
    wake: float | None = None
    for name, entry in wanted.items():
        if name in running and name not in cancel:
            continue
        done = outcomes.get(name)
        if done is None or done.key != entry.key:
            start.append(name)
        elif done.ready:
            if entry.keep_present and entry.reference not in present:
                start.append(name)  # the image disappeared from the store
        elif (wait := retry_in(done, entry, failed_retry_interval, hopeless,
                               permanent)) is not None:
            due = done.at + wait - now
            if due <= 0:
                start.append(name)
            else:
                wake = due if wake is None else min(wake, due)
    return Plan(tuple(sorted(start)), tuple(sorted(cancel)), wake)


#: Longest wait between two failed series, in multiples of the failed-retry interval.
SERIES_BACKOFF_CAP = 16
#: Spread of the series backoff (+-20 %).
JITTER = 0.2


def retry_in(outcome: Outcome, entry: Entry, interval: float, hopeless: Iterable[str],
             permanent: Iterable[str]) -> float | None:
    """Seconds after a failed series that the next one starts, or None: never (retries
    disabled, a hopeless reason, or a permanent one that failed ``backoffLimit`` series)."""
    if interval <= 0 or outcome.ready or outcome.reason in set(hopeless):
        return None
    if outcome.reason in set(permanent) and outcome.failures > entry.backoff_limit:
        return None
    return series_backoff(outcome, interval)


def series_backoff(outcome: Outcome, interval: float) -> float:
    """Seconds between a failed series and the next one: ``interval`` doubling per failed
    series, capped, times the outcome's jitter."""
    factor = min(2 ** max(outcome.failures - 1, 0), SERIES_BACKOFF_CAP)
    return interval * factor * outcome.jitter


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): doubling, capped."""
    return float(min(cap, initial * (2 ** max(attempt - 1, 0))))


# ----------------------------------------------------------------------------- disk budget


@dataclasses.dataclass(frozen=True)
class Budget:
    """The disk budget: a free-space floor and a maximum store size (0 = no limit)."""

    min_free_bytes: int = 0
    min_free_percent: float = 0.0
    max_store_bytes: int = 0

    def floor(self, capacity: int) -> int:
        """Free bytes that must remain on the store's filesystem."""
        return max(int(self.min_free_bytes), int(capacity * self.min_free_percent / 100))

    def check(self, expected: int, *, capacity: int, free: int, store_size: int) -> str | None:
        """None when ``expected`` more bytes fit; else a message saying what does not."""
        floor = self.floor(capacity)
        size = bytesizes.format
        if free - expected < floor:
            short = (f"needs about {size(expected)} but only {size(max(free - floor, 0))} is"
                     f" free above the floor of {size(floor)}" if expected else
                     f"only {size(free)} is free, below the floor of {size(floor)}")
            return (f"{short} (runtime.min_free_bytes / min_free_percent); free disk space or"
                    " lower the floor")
        if self.max_store_bytes and store_size + expected > self.max_store_bytes:
            return (f"needs about {size(expected)} but the store holds {size(store_size)} of"
                    f" its {size(self.max_store_bytes)} limit (runtime.max_store_bytes);"
                    " remove prefetches or raise the limit")
        return None


def expected_bytes(snapshot: events.ProgressSnapshot) -> int:
    """Disk a pull still needs for certain, from its progress: the compressed blobs it has
    still to download. What unpacking writes is not guessed from them (layers expand 1-1000
    times): it is counted as it is written (``bytes_unpacked``) and the budget checked again."""
    return max(snapshot.bytes_total - snapshot.bytes_done, 0)


# ----------------------------------------------------------------------------------- garbage


def garbage(records: Iterable[tuple[str, Mapping[str, str]]], wanted: Iterable[str],
            pinned: Iterable[str]) -> list[str]:
    """Names of image records to remove: written by the agent, wanted by no entry, and not
    pinned (``images.pinned_images``). Records the agent did not write are left alone."""
    keep = set(wanted) | set(pinned)
    return sorted(name for name, labels in records
                  if labels.get(LABEL_MANAGED) == MANAGED_BY and name not in keep
                  and labels.get(LABEL_IMAGE) not in keep)


def normalise(reference: str) -> str:
    """The normalised form of ``reference`` (as image records name it), or it unchanged."""
    try:
        return str(references.parse(reference))
    except Exception:
        return reference


# ------------------------------------------------------------------------------------ status


@dataclasses.dataclass
class ImageState:
    """The agent's view of one entry, written as its ``status.images[]`` item."""

    name: str
    image: str = ""
    phase: str = "Pending"
    digest: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    layers_done: int = 0
    layers_total: int = 0
    attempts: int = 0
    stalls: int = 0
    stall_cancellations: int = 0
    reason: str = ""
    message: str = ""
    start_time: str = ""
    completion_time: str = ""
    last_progress_time: str = ""
    #: when the agent tries a Failed entry again (empty: it will not)
    next_retry_time: str = ""
    #: the reason of the last failure announced with an Event (no repeats every series)
    announced: str = ""
    #: the :attr:`Entry.key` this state describes (None: read back from a status)
    version: tuple[Any, ...] | None = None
    #: stalls and cancellations of earlier attempts (the service counts per pull)
    _stalls_before: int = 0
    _cancellations_before: int = 0

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ImageState:
        """The state a previous agent process wrote (a restart continues from it)."""
        def number(key: str) -> int:
            value = status.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0
        state = cls(
            name=str(status.get("name", "")), image=str(status.get("image") or ""),
            phase=str(status.get("phase") or "Pending"), digest=str(status.get("digest") or ""),
            bytes_done=number("bytesDone"), bytes_total=number("bytesTotal"),
            layers_done=number("layersDone"), layers_total=number("layersTotal"),
            attempts=number("attempts"), stalls=number("stalls"),
            stall_cancellations=number("stallCancellations"),
            reason=str(status.get("reason") or ""), message=str(status.get("message") or ""),
            start_time=str(status.get("startTime") or ""),
            completion_time=str(status.get("completionTime") or ""),
            last_progress_time=str(status.get("lastProgressTime") or ""),
            next_retry_time=str(status.get("nextRetryTime") or ""),
        )
        if state.phase in FAILED_PHASES:
            state.announced = state.reason  # its Event was posted by the previous process
        return state

    def prepare(self, entry: Entry, now: str) -> bool:
        """A series for ``entry`` starts: a new version of the entry starts from Pending with
        fresh counters; the same version (a later series, or one the previous agent process
        began) keeps its counters and phase. True when the state was reset."""
        same = self.version == entry.key or (self.version is None and self.image
                                             == entry.reference)
        self.version = entry.key
        self.image = entry.reference
        if same:
            return False
        self.phase, self.reason, self.message, self.announced = "Pending", "", "", ""
        self.attempts, self.start_time, self.completion_time = 0, now, ""
        self.next_retry_time = ""
        self.bytes_done = self.bytes_total = self.layers_done = self.layers_total = 0
        return True

    def begin_attempt(self, now: str) -> None:
        """A new attempt starts: counters of the previous one become the base."""
        self.next_retry_time = ""
        self._stalls_before = self.stalls
        self._cancellations_before = self.stall_cancellations
        self.attempts += 1
        self.start_time = self.start_time or now
        self.completion_time = ""

    def observe(self, snapshot: events.ProgressSnapshot, now: str) -> bool:
        """Take a progress snapshot; True when the phase changed (an urgent write)."""
        phase = snapshot.phase.value
        if snapshot.phase in (events.Phase.FAILED, events.Phase.STALLED, events.Phase.READY):
            phase = self.phase  # the series decides final phases, not one attempt
        changed = phase != self.phase
        if snapshot.bytes_done > self.bytes_done:
            self.last_progress_time = now
        self.phase = phase
        self.bytes_done = snapshot.bytes_done
        self.bytes_total = snapshot.bytes_total
        self.layers_done = snapshot.layers_done
        self.layers_total = snapshot.layers_total
        self.stalls = self._stalls_before + snapshot.stalls
        cancellations = self._cancellations_before + snapshot.stall_cancellations
        changed = changed or cancellations != self.stall_cancellations
        self.stall_cancellations = cancellations
        if changed and phase in PULLING_PHASES:
            self.reason = ""
            self.message = ""
        return changed

    def to_status(self) -> specs.ImageStatus:
        """The ``status.images[]`` item (empty optional fields left out)."""
        status: specs.ImageStatus = {"name": self.name, "phase": self.phase}  # type: ignore[typeddict-item]
        message = self.message if len(self.message) <= MAX_MESSAGE else \
            self.message[:MAX_MESSAGE - 3] + "..."
        optional: dict[str, Any] = {
            "image": self.image, "digest": self.digest, "reason": self.reason,
            "message": message, "startTime": self.start_time,
            "completionTime": self.completion_time, "lastProgressTime": self.last_progress_time,
            "nextRetryTime": self.next_retry_time,
        }
        for key, value in optional.items():
            if value:
                status[key] = value  # type: ignore[literal-required]
        status["bytesDone"] = self.bytes_done
        status["bytesTotal"] = self.bytes_total
        status["layersDone"] = self.layers_done
        status["layersTotal"] = self.layers_total
        status["attempts"] = self.attempts
        status["stalls"] = self.stalls
        status["stallCancellations"] = self.stall_cancellations
        return status


def summary(statuses: Iterable[Mapping[str, Any]]) -> specs.NodeImageSetSummary:
    """Counts over ``status.images`` for ``kubectl get nis``."""
    items = list(statuses)
    return {
        "images": len(items),
        "ready": sum(1 for s in items if s.get("phase") == "Ready"),
        "pulling": sum(1 for s in items if s.get("phase") in PULLING_PHASES),
        "failed": sum(1 for s in items if s.get("phase") in FAILED_PHASES),
    }
