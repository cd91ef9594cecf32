"""One layer's files are written at a time in a process, whatever the number of pulls (two
layers at once were measured slower: one interpreter lock, and ext4 without a journal
contends on inode allocation), but a layer waiting for its download's bytes lets the next
one write meanwhile.

Instrumented, not timed: ``archive.apply`` is the real one, wrapped to record when each
layer's apply starts and ends and how many run at once.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
from fixtures import images as fixture_images
from fixtures import layers as L
from fixtures.registries import Registry

from agent import config
from agent.cli import pulling
from agent.images import descriptors, digests, service, snapshots, turns
from agent.images.content import local
from agent.images.registry import client, hosts
from agent.images.unpack import archive, readahead, unpacker
from tests.images.pulling import FAST_RETRY

AMD64 = descriptors.Platform("linux", "amd64")
WAIT = 10.0  # seconds a test waits for something that must happen (it happens in ms)


def image(tag: str, n_layers: int = 3, files: int = 20) -> L.Image:
    tars = []
    for n in range(n_layers):
        layer = L.Layer().dir(f"{tag}{n}")
        for i in range(files):
            layer.file(f"{tag}{n}/f{i}", L.random_bytes(2000, seed=n * 1000 + i))
        tars.append(layer.tar())
    return L.image(tars)


class ApplySpy:
    """Wraps ``archive.apply`` (the order in which layers start and end) and the applier's
    per-entry step (how many threads write entries at once). The first entry written waits
    (up to ``linger`` s) for another thread to write one, so an unpacker that would write
    two layers at once does so here."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, linger: float = 0.5) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.entries = 0
        self.events: list[tuple[str, str]] = []
        self.second = threading.Event()
        self.linger = linger
        self._first: threading.Thread | None = None
        real_apply, real_entry = archive.apply, archive._Applier._entry

        def apply(stream: Any, target: str, **kwargs: Any) -> archive.ApplyResult:
            name = str(kwargs.get("name", ""))
            with self.lock:
                self.events.append(("start", name))
            try:
                return real_apply(stream, target, **kwargs)
            finally:
                with self.lock:
                    self.events.append(("end", name))

        def entry(applier: Any, header: Any) -> None:
            me = threading.current_thread()
            with self.lock:
                self.active += 1
                self.entries += 1
                self.most = max(self.most, self.active)
                if self._first is None:
                    self._first = me
                    first = True
                else:
                    first = False
                    if me is not self._first:
                        self.second.set()
            try:
                if first:
                    self.second.wait(self.linger)
                real_entry(applier, header)
            finally:
                with self.lock:
                    self.active -= 1

        monkeypatch.setattr(archive, "apply", apply)
        monkeypatch.setattr(archive._Applier, "_entry", entry)


def unpack_in_threads(jobs: list[tuple[unpacker.Unpacker, L.Image]]) -> list[str]:
    results: list[str] = [""] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        u, img = jobs[i]
        try:
            results[i] = str(u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_two_pulls_write_one_layer_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ApplySpy(monkeypatch)
    a, b = image("a"), image("b")
    jobs = []
    for name, img in (("a", a), ("b", b)):
        sn = snapshots.OverlaySnapshotter(tmp_path / name)
        # Each pull takes up three layers at once; they share the process's turns.
        jobs.append((unpacker.Unpacker(L.MemoryProvider(img.blobs), sn, concurrency=3), img))
    tops = unpack_in_threads(jobs)

    assert spy.most == 1, spy.events
    assert len(spy.events) == 2 * 6
    assert tops == [str(digests.chain_ids(L.diff_ids_of(img))[-1]) for img in (a, b)]
    for (u, _), top in zip(jobs, tops, strict=True):
        assert u.snapshotter.stat(top).kind is snapshots.Kind.COMMITTED
        u.snapshotter.close()


def test_the_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = ApplySpy(monkeypatch, linger=WAIT)
    img = image("c")
    sn = snapshots.OverlaySnapshotter(tmp_path / "c")
    u = unpacker.Unpacker(
        L.MemoryProvider(img.blobs), sn, concurrency=3, turns=turns.Turns(2)
    )
    unpack_in_threads([(u, img)])
    assert spy.most == 2, spy.events
    sn.close()


def test_a_layer_waiting_for_its_download_lets_the_next_layer_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ApplySpy(monkeypatch, linger=0)
    img = image("d", n_layers=2, files=40)
    blob0 = img.blobs[img.layers[0][1]]
    digest0 = digests.Digest(img.layers[0][1])
    store = local.LocalStore(tmp_path / "content")
    writer = store.writer(digest0, total=len(blob0))
    feed = writer.follow(len(blob0), digest0)
    writer.write(blob0[: len(blob0) // 2])  # the rest has not arrived yet

    layer0 = f"layer {img.layers[0][1]}"

    class Provider(L.MemoryProvider):
        def open_blob(self, digest: str) -> Any:
            if digest == digest0:
                return feed.reader()  # layer 0: still downloading
            # Layer 1 is complete; it asks for a turn only once layer 0 holds one.
            deadline = time.monotonic() + WAIT
            while ("start", layer0) not in spy.events and time.monotonic() < deadline:
                time.sleep(0.005)
            return super().open_blob(digest)

    sn = snapshots.OverlaySnapshotter(tmp_path / "sn")
    u = unpacker.Unpacker(Provider(img.blobs), sn, concurrency=2, turns=turns.Turns(1))
    done = threading.Event()
    result: list[str] = []

    def run() -> None:
        result.append(str(u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))))
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        layer1 = f"layer {img.layers[1][1]}"
        deadline = time.monotonic() + WAIT
        while ("end", layer1) not in spy.events and time.monotonic() < deadline:
            time.sleep(0.01)
        # Layer 1 was written completely while layer 0, started first, waited for the rest
        # of its blob (without its turn: otherwise layer 1 could not have started).
        assert ("end", layer1) in spy.events, spy.events
        assert spy.events.index(("start", layer0)) < spy.events.index(("start", layer1))
        assert ("end", layer0) not in spy.events
        writer.write(blob0[len(blob0) // 2 :])
        writer.commit(len(blob0), digest0)
        assert done.wait(WAIT)
    finally:
        writer.close()  # after a failed assertion: the unpack stops waiting for the blob
        thread.join(WAIT)
        feed.close()
    assert result == [str(digests.chain_ids(L.diff_ids_of(img))[-1])]
    assert sorted(i.name for i in sn.walk() if i.kind is snapshots.Kind.COMMITTED) == sorted(
        str(c) for c in digests.chain_ids(L.diff_ids_of(img))
    )
    sn.close()


def test_a_cancelled_unpack_stops_waiting_for_its_turn(tmp_path: Path) -> None:
    shared = turns.Turns(1)
    cancel = threading.Event()
    waited: list[BaseException] = []
    with shared.turn():  # another pull's layer holds the turn
        def wait() -> None:
            try:
                with shared.turn(cancel):
                    pass
            except CancelledError as e:
                waited.append(e)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        deadline = time.monotonic() + WAIT
        while shared.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        cancel.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert waited and "cancelled while waiting for a turn" in str(waited[0])
        assert shared.held == 1 and shared.waiting == 0
    assert shared.held == 0


def test_turns_go_first_come_first_served() -> None:
    shared = turns.Turns(1)
    order: list[int] = []
    threads = []
    with shared.turn():
        for i in range(4):
            def take(i: int = i) -> None:
                with shared.turn():
                    order.append(i)

            t = threading.Thread(target=take, daemon=True)
            t.start()
            threads.append(t)
            deadline = time.monotonic() + WAIT
            while shared.waiting < i + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
    for t in threads:
        t.join(WAIT)
    assert order == [0, 1, 2, 3]
    assert shared.held == 0


def test_an_images_layers_take_their_turns_in_chain_order() -> None:
    """An unpacker asks for each layer's turn at (its line, the layer's index): a lower
    layer that asks late still goes before the higher ones of its image, and an image
    that started later goes after them all."""
    shared = turns.Turns(1)
    first_image, second_image = shared.line(), shared.line()
    order: list[tuple[int, int]] = []
    threads = []
    with shared.turn():  # another layer writes while they all ask
        for place in [(second_image, 0), (first_image, 2), (first_image, 0), (first_image, 1)]:
            def take(place: tuple[int, int] = place) -> None:
                with shared.turn(place=place):
                    order.append(place)

            t = threading.Thread(target=take, daemon=True)
            t.start()
            threads.append(t)
            deadline = time.monotonic() + WAIT
            while shared.waiting < len(threads) and time.monotonic() < deadline:
                time.sleep(0.005)
    for t in threads:
        t.join(WAIT)
    assert order == [(first_image, 0), (first_image, 1), (first_image, 2), (second_image, 0)]
    assert shared.held == 0


def test_a_thread_back_from_a_wait_keeps_its_place_in_line() -> None:
    """Layer 1 gives its turn away while its download is late; layer 2 writes meanwhile and
    layer 3 asks for a turn. Back from the wait, layer 1 goes before layer 3 (it asked
    first), so layers are written, and can be committed, in chain order."""
    shared = turns.Turns(1)
    order: list[str] = []
    in_wait, wait_over, second_in, third_asked = (threading.Event() for _ in range(4))

    def layer1() -> None:
        with shared.turn():
            order.append("1 starts")
            with turns.waiting():  # its download is late
                in_wait.set()
                assert wait_over.wait(WAIT)
            order.append("1 resumes")

    def layer2() -> None:
        with shared.turn():
            order.append("2")
            second_in.set()
            assert third_asked.wait(WAIT)
            wait_over.set()  # layer 1's bytes arrive while 2 still writes
            deadline = time.monotonic() + WAIT
            while shared.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.005)

    def layer3() -> None:
        with shared.turn():
            order.append("3")

    first = threading.Thread(target=layer1, daemon=True)
    first.start()
    assert in_wait.wait(WAIT)
    threads = [first, threading.Thread(target=layer2, daemon=True)]
    threads[1].start()
    assert second_in.wait(WAIT)
    third = threading.Thread(target=layer3, daemon=True)
    third.start()
    deadline = time.monotonic() + WAIT
    while shared.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    third_asked.set()
    for t in [*threads, third]:
        t.join(WAIT)
    assert order == ["1 starts", "2", "1 resumes", "3"]
    assert shared.held == 0 and shared.waiting == 0


def wait_for_waiters(shared: turns.Turns, n: int) -> None:
    deadline = time.monotonic() + WAIT
    while shared.waiting < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert shared.waiting == n


def test_a_layer_makes_way_for_an_earlier_one_back_from_its_wait() -> None:
    """Layer 2 writes while layer 3 and then layer 1 (back from waiting for its bytes) ask
    for the turn. Between two chunks layer 2 keeps it for layer 3, which comes after it,
    but makes way for layer 1 and resumes once layer 1 is done; layer 3 goes last. So
    layers are written, and committed, in chain order."""
    shared = turns.Turns(1)
    line = shared.line()
    order: list[str] = []
    threads: list[threading.Thread] = []

    def layer(index: int) -> None:
        with shared.turn(place=(line, index)):
            order.append(str(index))

    def ask(index: int) -> None:
        t = threading.Thread(target=layer, args=(index,), daemon=True)
        t.start()
        threads.append(t)

    with shared.turn(place=(line, 2)):
        order.append("2 starts")
        ask(3)
        wait_for_waiters(shared, 1)
        turns.make_way()
        order.append("2 keeps its turn")
        ask(1)
        wait_for_waiters(shared, 2)
        turns.make_way()
        order.append("2 resumes")
        assert shared.held == 1 and shared.waiting == 1
    for t in threads:
        t.join(WAIT)
    assert order == ["2 starts", "2 keeps its turn", "1", "2 resumes", "3"]
    assert shared.held == 0 and shared.waiting == 0
    turns.make_way()  # holding no turn: nothing to do


def test_a_read_ahead_layer_makes_way_before_its_next_chunk() -> None:
    """The applier of a layer reads its inflated bytes chunk by chunk from its read-ahead;
    a lower layer that asks meanwhile writes before the next chunk is handed out."""
    shared = turns.Turns(1)
    line = shared.line()
    order: list[str] = []
    data = bytes(range(256)) * 64  # four chunks of 4 KiB

    def lower() -> None:
        with shared.turn(place=(line, 0)):
            order.append("layer 0")

    with shared.turn(place=(line, 1)), readahead.Readahead(io.BytesIO(data), 4096) as ahead:
        order.append(f"chunk {len(ahead.read())}")
        t = threading.Thread(target=lower, daemon=True)
        t.start()
        wait_for_waiters(shared, 1)
        order.append(f"chunk {len(ahead.read())}")
    t.join(WAIT)
    assert order == ["chunk 4096", "layer 0", "chunk 4096"]


@pytest.mark.parametrize("configured, most", [(None, 1), (2, 2)])
async def test_a_pull_follows_images_max_concurrent_unpacks(
    configured: int | None,
    most: int,
    registry: Registry,
    tmp_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = ApplySpy(monkeypatch, linger=WAIT if configured else 0.5)
    image = fixture_images.Image(
        [fixture_images.layer({f"l{n}/f{i}": bytes([n]) * 3000 for i in range(20)})
         for n in range(3)]
    )
    fixture_images.push(registry, "turns/app", "1", image)
    text = "" if configured is None else f"[images]\nmax_concurrent_unpacks = {configured}\n"
    (tmp_path / "c.toml").write_text(text)
    options = pulling.service_options(config.load(tmp_path / "c.toml", env={}))
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, options)
        # A pulling process switches threads often enough for the read-ahead threads.
        assert sys.getswitchinterval() <= readahead.SWITCH_INTERVAL
        try:
            result = await svc.pull(f"{registry.host}/turns/app:1", platform=AMD64)
        finally:
            svc.close()
    assert spy.most == most, spy.events
    assert len([e for e in spy.events if e[0] == "end"]) == 3
    assert result.chain_id
