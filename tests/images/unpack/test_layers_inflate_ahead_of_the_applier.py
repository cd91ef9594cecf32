"""A layer is inflated and hashed on a thread of its own, a few chunks ahead of the tar
reader: the bytes, their order and the diff ID are the stream's; what the thread raised (a
corrupt stream, a bomb limit) is raised to the applier; closing it stops the thread.

Real gzip streams through ``compression.open_layer``; nothing is timed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import time

import pytest
from fixtures import layers as L

from agent.images import errors
from agent.images.unpack import archive, compression, readahead, tar

WAIT = 10.0


def test_the_applier_gets_every_byte_in_order_and_the_diff_id(tmp_path: object) -> None:
    raw = L.Layer().dir("d")
    for i in range(200):
        raw.file(f"d/f{i}", L.random_bytes(30_000, seed=i))
    data = raw.tar()
    stream = compression.open_layer(io.BytesIO(gzip.compress(data, 6)))
    with readahead.Readahead(stream, 64 * 1024) as ahead:
        got = b""
        while chunk := ahead.read():
            got += chunk
        assert got == data
        assert str(ahead.digest()) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_an_applied_layer_has_the_same_tree_and_diff_id(tmp_path: object) -> None:
    import pathlib

    root = pathlib.Path(str(tmp_path))
    layer = L.Layer().dir("etc")
    for i in range(50):
        layer.file(f"etc/f{i}", f"{i}\n".encode() * 500)
    data = layer.tar()
    (root / "a").mkdir()
    (root / "b").mkdir()
    plain = archive.apply(compression.open_layer(io.BytesIO(gzip.compress(data))), root / "a")
    stream = compression.open_layer(io.BytesIO(gzip.compress(data)))
    with readahead.Readahead(stream, tar.CHUNK) as ahead:
        ahead_result = archive.apply(ahead, root / "b")
    assert ahead_result.diff_id == plain.diff_id
    assert ahead_result.entries == plain.entries == 51
    assert sorted(p.name for p in (root / "b" / "etc").iterdir()) == sorted(
        p.name for p in (root / "a" / "etc").iterdir()
    )
    assert (root / "b" / "etc" / "f7").read_bytes() == b"7\n" * 500


def test_a_corrupt_stream_is_raised_to_the_applier(tmp_path: object) -> None:
    data = L.Layer().file("x", L.random_bytes(400_000, seed=1)).tar()
    blob = bytearray(gzip.compress(data))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # damaged in the middle
    stream = compression.open_layer(io.BytesIO(bytes(blob)), name="layer sha256:bad")
    with readahead.Readahead(stream, 16 * 1024) as ahead, pytest.raises(
        errors.UnsafeLayer, match="layer sha256:bad: corrupt or truncated gzip"
    ):
        while ahead.read():
            pass


class Endless:
    """A stream that never ends, counting the reads made of it."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, size: int = -1, /) -> bytes:
        self.reads += 1
        return b"\0" * 1024


def test_it_reads_only_a_few_chunks_ahead_and_stops_when_closed() -> None:
    source = Endless()
    ahead = readahead.Readahead(source, 1024, name="endless-test")
    deadline = time.monotonic() + WAIT
    while source.reads < readahead.DEPTH and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert source.reads <= readahead.DEPTH + 1  # bounded: it waits for the reader
    ahead.read()
    ahead.close()
    deadline = time.monotonic() + WAIT
    while any(t.name == "readahead endless-test" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the read-ahead thread did not stop"
        time.sleep(0.01)


def test_a_pulling_process_switches_threads_often_enough_for_the_read_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The read-ahead thread starves behind a tar reader under Python's 5 ms default.
    import sys

    monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.005)
    set_to: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", set_to.append)
    readahead.tune_interpreter()
    assert set_to == [readahead.SWITCH_INTERVAL] and readahead.SWITCH_INTERVAL <= 0.001
