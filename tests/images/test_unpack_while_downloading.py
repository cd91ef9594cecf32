"""A layer is unpacked while its blob downloads (``ArrivingBlobs`` hands the unpacker a
``FollowingReader`` of the ingest), but no snapshot is committed unless the blob was
committed (size and digest verified) and what was unpacked hashes to the layer's diff ID: a
download that is restarted from zero with other bytes, or that fails, never leaves a
snapshot made from bad bytes.

The registry is the in-process fake of ``registry/test_client_faults.py`` (it can ignore
``Range``); its first answer for the layer pauses mid-body until the test lets it go on.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from fixtures import images
from fixtures import layers as L

from agent.images import descriptors, errors, service, snapshots
from agent.images.content import local
from agent.images.registry import client, hosts
from agent.images.unpack import unpacker
from tests.images.registry.test_client_faults import HOST, FakeRegistry

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: overlay snapshots (whiteouts need CAP_MKNOD)"
)
AMD64 = descriptors.Platform("linux", "amd64")


def layer_tar() -> bytes:
    """Small files first (applied from the first bytes), then incompressible data."""
    layer = L.Layer().dir("etc")
    for i in range(40):
        layer.file(f"etc/small-{i}", f"file {i}\n".encode() * 50)
    return layer.file("big.bin", L.random_bytes(3_000_000, seed=7)).tar()


def one_layer_image() -> images.Image:
    tar = layer_tar()
    return images.Image([images.Layer(images.compress(tar, "gzip"), images.sha256(tar))])


class _PausedBody(httpx.AsyncByteStream):
    """Sends ``data[:pause_at]``, waits until ``go()`` is true, then ``data[pause_at:end]``."""

    def __init__(self, data: bytes, pause_at: int, go: Callable[[], bool], end: int) -> None:
        self.data, self.pause_at, self.go, self.end = data, pause_at, go, end

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, self.pause_at, 16_384):
            yield self.data[i : min(i + 16_384, self.pause_at)]
        deadline = time.monotonic() + 20
        while not self.go():
            assert time.monotonic() < deadline, "the unpack never read the first bytes"
            await asyncio.sleep(0.01)
        for i in range(self.pause_at, self.end, 16_384):
            yield self.data[i : min(i + 16_384, self.end)]


class PausingRegistry(FakeRegistry):
    """The layer's first GET serves ``first`` (bytes that may differ from the blob) up to
    ``pause_at``, pauses until ``go()``, then the rest up to ``end`` (a short body when
    ``end`` is less than the blob's size). Later GETs follow ``range_mode``."""

    def __init__(self, image: images.Image, *, first: bytes, pause_at: int, end: int,
                 go: Callable[[], bool], range_mode: str = "ignore") -> None:
        super().__init__(image, range_mode=range_mode)
        self.layer = image.layers[0]
        self.first, self.pause_at, self.end, self.go = first, pause_at, end, go
        self.layer_gets = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.layer.digest in request.url.path:
            self.layer_gets += 1
            if self.layer_gets == 1:
                self.blob_requests.append(request)
                return httpx.Response(
                    200, stream=_PausedBody(self.first, self.pause_at, self.go, self.end)
                )
        return super().handler(request)


class Spy:
    """Counts the speculative reads and the layer applies (first attempts and redos)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read_bytes = 0
        self.read = threading.Event()
        self.attempts: list[bool] = []  # speculate? per _apply_once
        real_read = local.FollowingReader.read
        real_once = unpacker.Unpacker._apply_once

        def read(reader: local.FollowingReader, size: int = -1, /) -> bytes:
            data = real_read(reader, size)
            self.read_bytes += len(data)
            if self.read_bytes > 70_000:
                self.read.set()
            return data

        def apply_once(self_: unpacker.Unpacker, *args: object) -> object:
            self.attempts.append(bool(args[-1]))
            return real_once(self_, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(local.FollowingReader, "read", read)
        monkeypatch.setattr(unpacker.Unpacker, "_apply_once", apply_once)


async def pull_from(fake: FakeRegistry, root: Path) -> service.PullResult:
    async with client.RegistryClient(
        hosts.RegistryHosts(None), None, transport=httpx.MockTransport(fake.handler),
        retry=client.RetryPolicy(attempts=2, base=0.001, cap=0.001),
    ) as rc:
        options = service.ServiceOptions(progress_timeout=2.0)  # overlayfs: the default
        svc = service.ImageService(root, rc, options)
        try:
            return await svc.pull(f"{HOST}/app:1", platform=AMD64)
        finally:
            svc.close()


def snapshot_kinds(root: Path) -> list[tuple[str, str]]:
    sn = snapshots.OverlaySnapshotter(root / "snapshots")
    try:
        return [(i.kind.name, i.name) for i in sn.walk()]
    finally:
        sn.close()


def unpacked_files(root: Path) -> dict[str, bytes]:
    found = {}
    for fs in (root / "snapshots" / "snapshots").glob("*/fs"):
        for path in fs.rglob("*"):
            if path.is_file():
                found[str(path.relative_to(fs))] = path.read_bytes()
    return found


def flipped(data: bytes, start: int, count: int) -> bytes:
    bad = bytearray(data)
    for i in range(start, start + count):
        bad[i] ^= 0xFF
    return bytes(bad)


async def test_a_layer_is_unpacked_before_its_blob_has_arrived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    seen: dict[str, object] = {}

    def go() -> bool:
        # Let the body go on once the unpack wrote files from the blob's first bytes,
        # and note what the store held at that moment.
        files = unpacked_files(tmp_path)
        if "etc/small-0" not in files:
            return False
        seen["files"] = files
        seen["kinds"] = snapshot_kinds(tmp_path)
        seen["blob_committed"] = local.LocalStore(tmp_path / "content").exists(layer.digest)
        return True

    fake = PausingRegistry(image, first=layer.data, pause_at=len(layer.data) // 2,
                           end=layer.size, go=go)
    result = await pull_from(fake, tmp_path)

    assert seen["blob_committed"] is False
    assert [kind for kind, _ in seen["kinds"]] == ["ACTIVE"]  # type: ignore[attr-defined]
    assert snapshot_kinds(tmp_path) == [("COMMITTED", result.chain_id)]
    files = unpacked_files(tmp_path)
    assert files["etc/small-3"] == b"file 3\n" * 50
    assert files["big.bin"] == L.random_bytes(3_000_000, seed=7)
    assert fake.layer_gets == 1


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-bytes", "other-bytes"])
async def test_a_download_restarted_from_zero_never_commits_a_snapshot_of_bad_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_bytes: bool
) -> None:
    """The first answer is cut short; the resume's ``Range`` is ignored, so the ingest is
    truncated to 0 and rewritten under the speculative unpack. With other bytes the first
    time (a corrupt prefix the unpack already read), that unpack is abandoned and the layer
    applied again from the committed blob; with the same bytes it stands."""
    image = one_layer_image()
    layer = image.layers[0]
    spy = Spy(monkeypatch)
    first = layer.data if same_bytes else flipped(layer.data, 30_000, 4)
    fake = PausingRegistry(image, first=first, pause_at=100_000, end=200_000,
                           go=spy.read.is_set)

    result = await pull_from(fake, tmp_path)

    assert [r.headers.get("range") for r in fake.blob_requests[-2:]] == [None, "bytes=200000-"]
    assert spy.attempts == ([True] if same_bytes else [True, False])
    assert snapshot_kinds(tmp_path) == [("COMMITTED", result.chain_id)]
    assert unpacked_files(tmp_path)["big.bin"] == L.random_bytes(3_000_000, seed=7)


@pytest.mark.parametrize("restarted", [False, True], ids=["straight", "restarted"])
async def test_a_layer_that_does_not_match_its_diff_id_fails_without_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarted: bool
) -> None:
    """The blob verifies but the config names another diff ID. Read straight through, the
    bytes applied were the committed blob's: the mismatch is the layer's error at once, not
    applied a second time. Read across a restart (the same bytes again), the apply cannot
    tell, so the layer is judged from the committed blob, which fails the same way."""
    tar = layer_tar()
    image = images.Image(
        [images.Layer(images.compress(tar, "gzip"), images.sha256(b"another layer"))]
    )
    layer = image.layers[0]
    spy = Spy(monkeypatch)
    fake = PausingRegistry(image, first=layer.data, pause_at=100_000,
                           end=200_000 if restarted else layer.size, go=spy.read.is_set)

    with pytest.raises(errors.DigestMismatch, match="config says its diff ID is"):
        await pull_from(fake, tmp_path)

    assert spy.attempts == ([True, False] if restarted else [True])
    assert snapshot_kinds(tmp_path) == []
    assert list((tmp_path / "snapshots" / "snapshots").iterdir()) == []


async def test_a_download_that_fails_verification_leaves_no_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every answer has a flipped byte past what the unpack read when it paused: the blob
    never verifies, the pull fails with the digest error, and the speculative snapshot is
    gone."""
    image = one_layer_image()
    layer = image.layers[0]
    spy = Spy(monkeypatch)
    bad = flipped(layer.data, layer.size - 1000, 1)
    fake = PausingRegistry(image, first=bad, pause_at=100_000, end=layer.size,
                           go=spy.read.is_set)
    fake.blobs[layer.digest] = bad

    with pytest.raises(errors.DigestMismatch, match=layer.digest):
        await pull_from(fake, tmp_path)

    assert spy.attempts == [True]
    assert snapshot_kinds(tmp_path) == []
    assert list((tmp_path / "snapshots" / "snapshots").iterdir()) == []
    assert not local.LocalStore(tmp_path / "content").exists(layer.digest)


async def test_a_cancelled_pull_removes_the_speculative_snapshot_and_resumes_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull cancelled mid-download (as a stall or the caller would) while the unpack
    follows the ingest leaves no snapshot; the next pull resumes the ingest with ``Range``
    and unpacks the layer."""
    image = one_layer_image()
    layer = image.layers[0]
    spy = Spy(monkeypatch)
    fake = PausingRegistry(image, first=layer.data, pause_at=100_000, end=layer.size,
                           go=lambda: False, range_mode="honour")

    task = asyncio.ensure_future(pull_from(fake, tmp_path))
    deadline = time.monotonic() + 20
    while not spy.read.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert snapshot_kinds(tmp_path) == []
    assert not local.LocalStore(tmp_path / "content").exists(layer.digest)

    result = await pull_from(fake, tmp_path)
    assert fake.blob_requests[-1].headers.get("range") == "bytes=100000-"
    assert snapshot_kinds(tmp_path) == [("COMMITTED", result.chain_id)]
    assert unpacked_files(tmp_path)["big.bin"] == L.random_bytes(3_000_000, seed=7)


def test_a_following_reader_is_certain_of_its_bytes_only_without_a_rewrite(
    tmp_path: Path,
) -> None:
    """The reader does not hash the compressed bytes again: the writer hashed every byte it
    wrote, and a reader that saw no truncation read exactly those. One open across a
    truncation and rewrite cannot be certain (its first bytes were other bytes), and one that
    did not read the whole blob is not confirmed at all."""
    store = local.LocalStore(tmp_path)
    data = L.random_bytes(300_000, seed=3)
    digest = images.sha256(data)

    writer = store.writer(digest, total=len(data))
    feed = writer.follow(len(data), digest)
    writer.write(b"x" * 100_000)
    with feed.reader() as reader, feed.reader() as unfinished:
        assert reader.read(50_000) == b"x" * 50_000
        assert unfinished.read(10) == b"x" * 10
        writer.truncate(0)
        writer.write(data)
        writer.commit(len(data), digest)
        rest = b""
        while chunk := reader.read(65_536):
            rest += chunk
        assert rest == data[50_000:]
        assert reader.confirm() is False  # read across the rewrite: the diff ID decides
        with pytest.raises(errors.Unavailable, match="10 of its 300000 bytes were read"):
            unfinished.confirm()
        # Opened after the rewrite, read to the end: certainly the committed blob.
        with feed.reader() as again:
            got = b""
            while chunk := again.read(100_000):
                got += chunk
            assert got == data
            assert again.confirm() is True
    feed.close()


def test_a_following_reader_waits_for_bytes_and_fails_with_the_writer(tmp_path: Path) -> None:
    store = local.LocalStore(tmp_path)
    data = L.random_bytes(200_000, seed=4)
    digest = images.sha256(data)
    writer = store.writer(digest, total=len(data))
    feed = writer.follow(len(data), digest)
    got: list[bytes] = []
    failed: list[BaseException] = []

    def read() -> None:
        with feed.reader() as reader:
            try:
                while chunk := reader.read(100_000):
                    got.append(chunk)
            except errors.Unavailable as e:
                failed.append(e)

    thread = threading.Thread(target=read)
    thread.start()
    writer.write(data[:70_000])
    deadline = time.monotonic() + 10
    while sum(map(len, got)) < 70_000:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert b"".join(got) == data[:70_000]  # what was there, without waiting for all of it
    writer.close()  # a download that stops without a commit (kept for a resume)
    thread.join(10)
    assert not thread.is_alive()
    assert failed and "failed or was interrupted" in str(failed[0])
    feed.close()


async def test_a_failed_download_does_not_leave_the_unpack_waiting_for_other_blobs(
    tmp_path: Path,
) -> None:
    """One download at a time: while layer 0 downloads, an unpack thread waits for layer 1,
    whose download never starts. Layer 0 fails verification; the pull must fail with that
    error, not hang (the waiting unpack thread would hold up the task group)."""
    tars = [L.Layer().file(f"f{i}", L.random_bytes(2_000_000, seed=i)).tar() for i in range(2)]
    image = images.Image([images.Layer(images.compress(t, "gzip"), images.sha256(t))
                          for t in tars])
    layer = image.layers[0]
    bad = flipped(layer.data, layer.size - 100, 1)
    released = time.monotonic() + 0.5
    fake = PausingRegistry(image, first=bad, pause_at=300_000, end=layer.size,
                           go=lambda: time.monotonic() > released)
    fake.blobs[layer.digest] = bad

    async def pull() -> None:
        async with client.RegistryClient(
            hosts.RegistryHosts(None), None, transport=httpx.MockTransport(fake.handler),
        ) as rc:
            options = service.ServiceOptions(
                max_concurrent_downloads=1, progress_timeout=0
            )
            svc = service.ImageService(tmp_path, rc, options)
            try:
                await svc.pull(f"{HOST}/app:1", platform=AMD64)
            finally:
                svc.close()

    with pytest.raises(errors.DigestMismatch, match=layer.digest):
        await asyncio.wait_for(pull(), 30)
    assert snapshot_kinds(tmp_path) == []
