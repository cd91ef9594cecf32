"""Render pull progress events for ``prefetcher pull``.

A renderer is a callable taking each :class:`~agent.images.progress.ProgressEvent` (pass it
as the pull's ``on_event``) plus a ``close()`` for the end of the pull. Events arrive per
chunk, so every renderer does O(1) work per event and writes only when something a person
wants to read happened:

* ``tty`` — rich progress bars: one per blob (short digest, bytes/total, speed, and its
  retry/stall status inline) and a total bar (phase, layers, retries, stalls). A fatal
  stall is also printed as a line above the bars.
* ``plain`` — for pipes and logs: one line per phase change, blob done, layer unpacked,
  retry and stall, plus a totals line at most every ``interval`` seconds; never a line
  per chunk.
* ``json`` — silent while pulling; the command prints one JSON result at the end
  (:attr:`Renderer.last` holds the final snapshot for it).
* ``auto`` — ``tty`` when the stream is a terminal, else ``plain``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

from rich import filesize

from agent.images import progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

Mode = Literal["auto", "tty", "plain", "json"]
MODES: tuple[str, ...] = ("auto", "tty", "plain", "json")

#: Seconds between the plain renderer's totals lines.
PLAIN_PROGRESS_INTERVAL = 10.0


class Renderer(Protocol):
    """Consumes progress events; ``close()`` once the pull is over (idempotent)."""

    last: progress.ProgressSnapshot | None

    def __call__(self, event: progress.ProgressEvent) -> None: ...

    def close(self) -> None: ...


def make_renderer(mode: str, stream: TextIO, *, console: Console | None = None) -> Renderer:
    """The renderer for ``mode`` (``auto``, ``tty``, ``plain``, ``json``) writing to
    ``stream`` (usually stderr, so stdout stays for the result).

    ``console`` overrides the rich console of the ``tty`` renderer (tests pass one that
    writes to a ``StringIO`` with ``force_terminal=True``).

    Raises:
        ValueError: for an unknown mode, naming the accepted ones.
    """
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        mode = "tty" if console is not None or (isatty is not None and isatty()) else "plain"
    if mode == "tty":
        return TtyRenderer(stream, console=console)
    if mode == "plain":
        return PlainRenderer(stream)
    if mode == "json":
        return JsonRenderer()
    raise ValueError(f"unknown progress mode {mode!r}: expected one of {', '.join(MODES)}")


def _short(digest: str | None) -> str:
    if not digest:
        return ""
    return digest.split(":", 1)[-1][:12]


def _size(n: int) -> str:
    return filesize.decimal(n)


class _Base:
    last: progress.ProgressSnapshot | None = None

    def __enter__(self) -> _Base:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        pass


class JsonRenderer(_Base):
    """Writes nothing; keeps the last snapshot for the final JSON result."""

    def __call__(self, event: progress.ProgressEvent) -> None:
        self.last = event.snapshot


class PlainRenderer(_Base):
    """One line per event worth reading; a totals line at most every ``interval`` s."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = PLAIN_PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self._clock = clock
        self._next_totals = clock() + interval

    def __call__(self, event: progress.ProgressEvent) -> None:
        self.last = snap = event.snapshot
        if isinstance(event, progress.BlobProgress):
            now = self._clock()
            if now >= self._next_totals:
                self._next_totals = now + self.interval
                self._write(self._totals(snap))
            return
        if isinstance(event, progress.PhaseChanged):
            line = f"{snap.reference}: {event.phase}"
            if event.message:
                line += f": {event.message}"
            elif event.phase is progress.Phase.DOWNLOADING and snap.blobs_total:
                line += f" {snap.blobs_total} blobs, {_size(snap.bytes_total)}"
            self._write(line)
        elif isinstance(event, progress.BlobDone):
            if event.present:
                self._write(f"{_short(event.digest)}: already present")
            else:
                self._write(f"{_short(event.digest)}: done {_size(event.total)}")
        elif isinstance(event, progress.LayerUnpacked):
            self._write(f"{_short(event.digest)}: unpacked")
        elif isinstance(event, progress.Retry):
            what = "retry (stalled)" if event.stalled else "retry"
            self._write(
                f"{_short(event.digest) or snap.reference}: {what} {event.attempt}: {event.reason}"
            )
        elif isinstance(event, progress.Stalled):
            who = _short(event.digest) or snap.reference
            if event.fatal:
                self._write(f"{who}: stalled, cancelling the pull: {event.message}")
            else:
                self._write(f"{who}: stalled, resuming: {event.message}")

    @staticmethod
    def _totals(snap: progress.ProgressSnapshot) -> str:
        line = (
            f"{snap.reference}: {_size(snap.bytes_done)} / {_size(snap.bytes_total)} "
            f"({snap.fraction:.0%}), blobs {snap.blobs_done}/{snap.blobs_total}, "
            f"layers {snap.layers_done}/{snap.layers_total}"
        )
        if snap.retries:
            line += f", retries {snap.retries}"
        if snap.stalls:
            line += f", stalls {snap.stalls}"
        return line

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class TtyRenderer(_Base):
    """rich progress bars: one per blob plus a total bar; started on the first event."""

    def __init__(
        self,
        stream: TextIO,
        *,
        console: Console | None = None,
        auto_refresh: bool = True,
    ) -> None:
        # rich.progress is imported here: it is not cheap, and only a terminal needs it.
        from rich import console as rich_console
        from rich import progress as rich_progress

        self.console = console or rich_console.Console(file=stream)
        self._progress: Progress = rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"),
            rich_progress.BarColumn(bar_width=30),
            rich_progress.DownloadColumn(),
            rich_progress.TransferSpeedColumn(),
            rich_progress.TextColumn("{task.fields[status]}"),
            console=self.console,
            auto_refresh=auto_refresh,
            refresh_per_second=5,
        )
        self._tasks: dict[str, TaskID] = {}
        self._total: TaskID | None = None
        self._started = False
        self._closed = False

    def __call__(self, event: progress.ProgressEvent) -> None:
        if self._closed:
            return
        snap = self.last = event.snapshot
        bars = self._progress
        if self._total is None:
            self._total = bars.add_task(str(snap.phase), total=snap.bytes_total or None, status="")
            bars.start()
            self._started = True
        if isinstance(event, progress.BlobProgress):
            bars.update(self._task(event.digest, event.total), completed=event.done)
        elif isinstance(event, progress.BlobStarted):
            task = self._task(event.digest, event.total)
            bars.update(task, completed=event.offset)
        elif isinstance(event, progress.BlobDone):
            status = "[dim]already present" if event.present else "[green]done"
            bars.update(self._task(event.digest, event.total), completed=event.total, status=status)
        elif isinstance(event, progress.LayerUnpacked):
            task_id = self._tasks.get(event.digest)
            if task_id is not None:
                bars.update(task_id, status="[green]unpacked")
        elif isinstance(event, progress.Retry):
            if event.digest is not None and event.digest in self._tasks:
                what = "stalled, retry" if event.stalled else "retry"
                bars.update(
                    self._tasks[event.digest],
                    status=f"[yellow]{what} {event.attempt}: {event.reason}",
                )
            else:
                bars.console.print(f"[yellow]retry {event.attempt}: {event.reason}")
        elif isinstance(event, progress.Stalled):
            if event.digest is not None and event.digest in self._tasks:
                color = "red" if event.fatal else "yellow"
                bars.update(self._tasks[event.digest], status=f"[{color}]stalled")
            if event.fatal:
                bars.console.print(f"[red]stalled, cancelling the pull: {event.message}")
        self._update_total(snap)

    def _task(self, digest: str, total: int) -> TaskID:
        task_id = self._tasks.get(digest)
        if task_id is None:
            task_id = self._progress.add_task(_short(digest), total=total, status="")
            self._tasks[digest] = task_id
        return task_id

    def _update_total(self, snap: progress.ProgressSnapshot) -> None:
        assert self._total is not None
        status = f"layers {snap.layers_done}/{snap.layers_total}"
        if snap.retries:
            status += f" [yellow]retries {snap.retries}[/]"
        if snap.stalls:
            status += f" [yellow]stalls {snap.stalls}[/]"
        if snap.stall_cancellations:
            status += " [red]cancelled: stalled[/]"
        self._progress.update(
            self._total,
            description=f"[bold]{snap.phase}",
            total=snap.bytes_total or None,
            completed=snap.bytes_done,
            status=status,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._progress.stop()
