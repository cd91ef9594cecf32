"""Structured logging for the entry points: text or JSON lines, with trace and span ids.

:func:`setup` installs one handler on the root logger (``runtime.log_level``,
``runtime.log_format``). Every record gets ``trace_id`` and ``span_id`` from the current
OpenTelemetry span ("" outside a recording span), so a log line can be found from a trace
and back. Fields passed with ``extra={...}`` become JSON keys, or ``key=value`` pairs in
text.

:class:`PullLogger` is an ``on_event`` observer that writes one line when a pull starts
and one when it finishes (bytes, duration, throughput, stalls…). The service emits those
events inside its pull span, so both lines carry the pull's trace id::

    pull_log = logs.PullLogger()
    result = await svc.pull(ref, on_event=logs.tee(reporter, pull_log, recorder))
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from opentelemetry import trace

from agent.images.progress import events

__all__ = [
    "JsonFormatter",
    "PullLogger",
    "PullTally",
    "TextFormatter",
    "TraceContextFilter",
    "setup",
    "tee",
]

PULL_LOGGER = "agent.pull"

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "trace_id", "span_id", "taskName"}
)
_HANDLER_MARK = "_prefetcher_handler"


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (lowercase hex, or "") from the current span."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = ""
            record.span_id = ""
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``trace_id``,
    ``span_id``, the record's extra fields, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            data["trace_id"] = trace_id
            data["span_id"] = getattr(record, "span_id", "")
        for key, value in _extras(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message key=value… trace_id=… span_id=…``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        ]
        fields = _extras(record)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            fields["trace_id"] = trace_id
            fields["span_id"] = getattr(record, "span_id", "")
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def setup(
    level: str = "info", fmt: str = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Log ``level`` and above from every logger to ``stream`` (stderr) as ``fmt``
    (``text`` or ``json``). Calling it again replaces the handler it installed before."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO (and whose lines carry URLs) stay at WARNING.
    for name in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


def tee(*callbacks: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """One ``on_event`` callback calling each of ``callbacks`` (``None`` ones skipped)."""
    chosen = [c for c in callbacks if c is not None]

    def call(event: Any) -> None:
        for c in chosen:
            c(event)

    return call


class PullTally:
    """What the events of one pull add up to, for metrics and the summary log line.

    Feed it every event (``tally(event)``); it counts the bytes that actually came over the
    wire (per-blob deltas of :class:`BlobProgress`, a restart from zero counts again), and
    remembers when the pull started, unpacking's window and the final phase.
    """

    def __init__(self, reference: str = "", clock: Callable[[], float] = time.monotonic):
        self.reference = reference
        self._clock = clock
        self.started = clock()
        self.first_event: float | None = None
        self.bytes_downloaded = 0
        self.blobs_downloaded = 0
        self._done: dict[str, int] = {}
        self.first_blob_done: float | None = None
        self.last_layer_unpacked: float | None = None
        self.snapshot = events.ProgressSnapshot(reference=reference)
        self.phase = events.Phase.PENDING
        self.message = ""

    def __call__(self, event: events.ProgressEvent) -> None:
        now = self._clock()
        if self.first_event is None:
            self.first_event = now
        self.snapshot = event.snapshot
        if not self.reference:
            self.reference = event.snapshot.reference
        if isinstance(event, events.BlobProgress):
            key = str(event.digest)
            before = self._done.get(key, 0)
            if event.done > before:
                self.bytes_downloaded += event.done - before
            self._done[key] = event.done
        elif isinstance(event, events.BlobStarted):
            self._done[str(event.digest)] = event.offset
        elif isinstance(event, events.BlobDone):
            if not event.present:
                self.blobs_downloaded += 1
            if self.first_blob_done is None:
                self.first_blob_done = now
        elif isinstance(event, events.LayerUnpacked):
            self.last_layer_unpacked = now
        elif isinstance(event, events.PhaseChanged):
            self.phase = event.phase
            self.message = event.message
        elif isinstance(event, events.Stalled) and event.fatal:
            self.phase = events.Phase.STALLED
            self.message = event.message

    @property
    def elapsed(self) -> float:
        return max(0.0, self._clock() - self.started)

    @property
    def unpack_seconds(self) -> float | None:
        """From the first blob committed (unpacking may start) to the last layer unpacked."""
        if self.first_blob_done is None or self.last_layer_unpacked is None:
            return None
        return max(0.0, self.last_layer_unpacked - self.first_blob_done)

    @property
    def digest(self) -> str:
        """The pulled digest, from the Ready phase's ``reference@digest`` message."""
        if self.phase is events.Phase.READY and "@" in self.message:
            return self.message.rsplit("@", 1)[1]
        return ""


class PullLogger:
    """An ``on_event`` observer logging one line at a pull's start and one at its end.

    The start line (``pull started``) is written at the first event; the end line
    (``pull finished`` at INFO, ``pull failed`` at WARNING) at the final phase, with the
    fields ``reference``, ``result``, ``digest``, ``bytes_downloaded``, ``bytes_total``,
    ``duration_seconds``, ``throughput_bytes_per_second``, ``layers``, ``retries``,
    ``stalls``, ``stall_cancellations`` (and ``error`` on failure). ``fields`` are added to
    both lines (e.g. ``{"node": ..., "prefetch": ...}``).
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        reference: str = "",
        fields: dict[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
    ):
        self.logger = logger or logging.getLogger(PULL_LOGGER)
        self.fields = dict(fields or {})
        self.tally = PullTally(reference, clock) if clock is not None else PullTally(reference)
        self._started = False
        self._finished = False

    def __call__(self, event: events.ProgressEvent) -> None:
        self.tally(event)
        if not self._started:
            self._started = True
            self.logger.info(
                "pull started", extra={"reference": self.tally.reference, **self.fields}
            )
        if self._finished:
            return
        if isinstance(event, events.PhaseChanged) and event.phase in (
            events.Phase.READY, events.Phase.FAILED
        ):
            self._finish(error=event.message if event.phase is events.Phase.FAILED else None)

    def finish(self, error: BaseException | None = None) -> None:
        """Write the end line now if the events did not (a cancelled pull), once."""
        if not self._finished:
            self._finish(error=str(error) if error is not None else "cancelled")

    def _finish(self, error: str | None) -> None:
        self._finished = True
        t = self.tally
        snap = t.snapshot
        seconds = t.elapsed
        summary: dict[str, Any] = {
            "reference": t.reference,
            "result": "success" if error is None else (
                "stalled" if snap.stall_cancellations else "failure"
            ),
            "digest": t.digest,
            "bytes_downloaded": t.bytes_downloaded,
            "bytes_total": snap.bytes_total,
            "duration_seconds": round(seconds, 3),
            "throughput_bytes_per_second": round(t.bytes_downloaded / seconds) if seconds else 0,
            "layers": snap.layers_total,
            "retries": snap.retries,
            "stalls": snap.stalls,
            "stall_cancellations": snap.stall_cancellations,
            **self.fields,
        }
        if error is None:
            self.logger.info("pull finished", extra=summary)
        else:
            summary["error"] = error
            self.logger.warning("pull failed", extra=summary)
