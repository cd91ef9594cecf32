"""Conformance checks any ContentStore must pass (containerd's content testsuite, in spirit).

A store module's test file calls ``define_suite(make_store)`` from module scope to get every
check as a test function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.images import digests, errors
from agent.images.content import store

MakeStore = Callable[[Path], Any]


def define_suite(make_store: MakeStore) -> dict[str, Callable[..., None]]:
    """Return test functions bound to ``make_store``; assign them into a test module."""

    def test_a_committed_blob_reads_back_with_its_size(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = os.urandom(100_000)
        d = digests.of(data)
        w = s.writer("ref-1", total=len(data))
        w.write(data[:40_000])
        w.write(data[40_000:])
        info = w.commit(len(data), d)
        assert info.digest == d and info.size == len(data)
        with s.open_blob(d) as f:
            assert f.read() == data
        assert s.exists(d) and s.info(d).size == len(data)
        assert [i.digest for i in s.walk()] == [d]
        assert s.ingests() == []

    def test_an_ingest_is_invisible_until_committed(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = b"hello"
        d = digests.of(data)
        w = s.writer("ref-1", total=5)
        w.write(data)
        assert not s.exists(d)
        with pytest.raises(errors.NotFound):
            s.open_blob(d)
        w.close()
        assert [st.ref for st in s.ingests()] == ["ref-1"]

    def test_a_closed_ingest_resumes_at_its_offset_with_the_same_hash(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = os.urandom(50_000)
        d = digests.of(data)
        w = s.writer("ref-1", total=len(data))
        w.write(data[:12_345])
        w.close()
        w2 = make_store(tmp_path).writer("ref-1", total=len(data))
        assert w2.offset == 12_345
        w2.write(data[12_345:])
        assert w2.commit(len(data), d).digest == d

    def test_truncate_restarts_the_ingest(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = b"correct bytes"
        w = s.writer("ref-1")
        w.write(b"wrong prefix that will be dropped")
        w.truncate(0)
        assert w.offset == 0
        w.write(data)
        assert w.commit(len(data), digests.of(data)).size == len(data)

    def test_a_digest_mismatch_commits_nothing_and_drops_the_ingest(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        claimed = digests.of(b"what the manifest says")
        w = s.writer("ref-1")
        w.write(b"what the registry sent!")
        with pytest.raises(errors.DigestMismatch, match=str(claimed)):
            w.commit(23, claimed)
        assert not s.exists(claimed)
        assert list(s.walk()) == [] and s.ingests() == []

    def test_a_size_mismatch_commits_nothing(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = b"12345"
        w = s.writer("ref-1")
        w.write(data)
        with pytest.raises(errors.SizeMismatch):
            w.commit(6, digests.of(data))
        assert list(s.walk()) == []

    def test_committing_an_existing_blob_says_already_exists(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        data = b"same"
        d = digests.of(data)
        for ref in ("a", "b"):
            w = s.writer(ref)
            w.write(data)
            if ref == "a":
                w.commit(4, d)
            else:
                with pytest.raises(errors.AlreadyExists):
                    w.commit(4, d)
        assert [i.digest for i in s.walk()] == [d] and s.ingests() == []

    def test_a_second_writer_of_the_same_ref_is_refused(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        w = s.writer("ref-1")
        with pytest.raises(errors.Unavailable, match="ref-1"):
            s.writer("ref-1")
        w.close()
        s.writer("ref-1").abort()
        assert s.ingests() == []

    def test_delete_removes_a_blob(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        w = s.writer("r")
        w.write(b"x")
        d = w.commit(1, digests.of(b"x")).digest
        s.delete(d)
        assert not s.exists(d)
        with pytest.raises(errors.NotFound):
            s.delete(d)

    def test_the_store_satisfies_every_capability_protocol(tmp_path: Path) -> None:
        s = make_store(tmp_path)
        for proto in (store.BlobProvider, store.BlobInfo, store.BlobIngester, store.BlobManager):
            assert isinstance(s, proto)

    return {name: fn for name, fn in locals().items() if name.startswith("test_")}
