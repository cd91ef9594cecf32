"""Structured logging for the entry points: text or JSON lines, with trace and span ids.

:func:`setup` installs one handler on the root logger (``runtime.log_level``,
``runtime.log_format``). Every record gets ``trace_id`` and ``span_id`` from the current
OpenTelemetry span ("" outside a recording span), so a log line can be found from a trace
and back. Fields passed with ``extra={...}`` become JSON keys, or ``key=value`` pairs in
text. kopf's per-object records carry the object as ``object`` (``{"kind", "namespace",
"name", "uid"}`` in JSON, ``object=namespace/name`` in text), as kopf's own JSON logs do.

Everything the process would otherwise print on stderr by itself goes through the same
handler, so that with ``json`` every line is one JSON object: an uncaught exception
(``sys.excepthook``, ``threading.excepthook``), an "Exception ignored in" one
(``sys.unraisablehook``), ``warnings.warn`` and a record that cannot be formatted. A
traceback is the ``exception`` field (``stack`` for ``stack_info``), never extra lines.

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
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

from opentelemetry import trace

from agent import config
from agent.images.progress import events

__all__ = [
    "JsonFormatter",
    "PullLogger",
    "PullTally",
    "TextFormatter",
    "TraceContextFilter",
    "requested_format",
    "setup",
    "startup_error",
    "tee",
]

PULL_LOGGER = "agent.pull"
#: The logger of uncaught exceptions, warnings and unformattable records.
PROCESS_LOGGER = "agent.process"

#: Attributes every LogRecord has; anything else on a record came from ``extra``. kopf's
#: object loggers add ``settings`` (the whole OperatorSettings) and ``k8s_skip`` (whether
#: to post an Event): neither is a field; ``k8s_ref`` becomes ``object``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "trace_id", "span_id", "taskName",
       "settings", "k8s_skip", "k8s_ref"}
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


def _object(record: logging.LogRecord) -> dict[str, str]:
    """The Kubernetes object a kopf per-object record is about (empty values dropped)."""
    ref = getattr(record, "k8s_ref", None)
    if not isinstance(ref, dict):
        return {}
    return {k: str(v) for k, v in ref.items() if v and k in ("kind", "namespace", "name", "uid")}


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
        obj = _object(record)
        if obj:
            data["object"] = obj
        for key, value in _extras(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message key=value… trace_id=… span_id=…``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        ]
        fields = _extras(record)
        obj = _object(record)
        if obj:
            fields["object"] = "/".join(obj[k] for k in ("namespace", "name") if k in obj)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            fields["trace_id"] = trace_id
            fields["span_id"] = getattr(record, "span_id", "")
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class _Handler(logging.StreamHandler):
    """A stream handler whose own failures are one more line in the same format."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not logging.raiseExceptions:
            return
        failure = logging.LogRecord(
            PROCESS_LOGGER, logging.ERROR, __file__, 0,
            "could not format a log record of %s (%s:%s): %r",
            (record.name, record.pathname, record.lineno, record.msg), sys.exc_info(),
        )
        try:
            self.stream.write(self.format(failure) + self.terminator)
            self.flush()
        except Exception:  # noqa: BLE001 - nothing is left to report it with
            pass


def setup(
    level: str = "info", fmt: str = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Log ``level`` and above from every logger to ``stream`` (stderr) as ``fmt``
    (``text`` or ``json``), uncaught exceptions and warnings included (see the module's
    docstring). Calling it again replaces the handler it installed before."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    # kopf.configure() installs a text handler of its own; ours replaces it.
    for other in [h for h in root.handlers if type(h).__name__ == "_KopfStreamHandler"]:
        root.removeHandler(other)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO (and whose lines carry URLs) stay at WARNING.
    for name in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _route_process_errors()
    return handler


def _route_process_errors() -> None:
    """Uncaught exceptions, unraisable ones and warnings become records of
    :data:`PROCESS_LOGGER` (formatted by the handler) instead of raw stderr text."""
    log = logging.getLogger(PROCESS_LOGGER)

    def excepthook(kind: type[BaseException], value: BaseException,
                   tb: TracebackType | None) -> None:
        log.critical("uncaught exception: %s", value or kind.__name__,
                     exc_info=(kind, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("uncaught exception in thread %s: %s", name,
                  args.exc_value or args.exc_type.__name__,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]

    def unraisablehook(args: Any) -> None:
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.warning("%s: %r", args.err_msg or "Exception ignored in", args.object,
                    exc_info=exc_info if args.exc_type is not None else None)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    logging.captureWarnings(True)


def requested_format(config_path: str | None = None,
                     environ: Mapping[str, str] | None = None) -> str:
    """``runtime.log_format`` as ``$PREFETCHER_RUNTIME__LOG_FORMAT`` or the config file asks
    for it, read without validating anything else (for when the settings do not validate):
    ``json`` or ``text``. The file is ``config_path``, else ``$PREFETCHER_CONFIG``, else
    ``/etc/prefetcher/config.toml``; version 1's ``[agent] log_json = true`` counts too."""
    env = os.environ if environ is None else environ
    asked: Any = env.get(f"{config.ENV_PREFIX}RUNTIME__LOG_FORMAT")
    if asked is None:
        path = config_path or env.get(config.CONFIG_ENV_VAR) or config.DEFAULT_CONFIG_PATH
        try:
            data = config.read_file(path, raw=True) if str(path) != "-" else {}
        except config.ConfigError:
            data = {}
        runtime, v1 = data.get("runtime"), data.get("agent")
        if isinstance(runtime, dict):
            asked = runtime.get("log_format")
        if asked is None and isinstance(v1, dict) and v1.get("log_json") is True:
            asked = "json"
    return "json" if str(asked).strip().lower() == "json" else "text"


def startup_error(command: str, message: str, fmt: str) -> None:
    """The one line saying why ``prefetcher COMMAND`` cannot start (before :func:`setup`),
    on stderr: a JSON record for ``fmt`` ``json`` (e.g. :func:`requested_format` when
    the settings themselves are invalid), else ``prefetcher COMMAND: message``."""
    if fmt == "json":
        record = logging.LogRecord(f"agent.cli.{command}", logging.ERROR, __file__, 0,
                                   "prefetcher %s: %s", (command, message), None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"prefetcher {command}: {message}", file=sys.stderr)


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
