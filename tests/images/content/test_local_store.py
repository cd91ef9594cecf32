"""LocalStore: the conformance suite, plus what only a filesystem store promises."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from agent.images import digests
from agent.images.content import local
from tests.images.content import suite

globals().update(suite.define_suite(lambda root: local.LocalStore(root)))


def test_committed_blobs_are_read_only_and_named_by_digest(tmp_path: Path) -> None:
    s = local.LocalStore(tmp_path)
    w = s.writer("r")
    w.write(b"data")
    d = w.commit(4, digests.of(b"data")).digest
    path = tmp_path / "blobs" / "sha256" / d.hex
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_a_writer_in_another_process_holds_the_ref(tmp_path: Path) -> None:
    script = (
        "import sys, time; from agent.images.content import local;"
        f" w = local.LocalStore({str(tmp_path)!r}).writer('shared'); w.write(b'abc');"
        " print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        s = local.LocalStore(tmp_path)
        try:
            s.writer("shared")
        except Exception as e:  # noqa: BLE001 - asserting the type below
            assert type(e).__name__ == "Unavailable"
        else:
            raise AssertionError("a second process could open a held ingest")
        assert s.clean_ingests() == []  # held: not cleaned
    finally:
        proc.kill()
        proc.wait()
    # The writer died (kill -9): its ingest is resumable, and cleanable.
    s = local.LocalStore(tmp_path)
    w = s.writer("shared")
    assert w.offset == 3
    w.close()
    assert s.clean_ingests() == ["shared"]
    assert s.ingests() == []


def test_usage_counts_committed_bytes_only(tmp_path: Path) -> None:
    s = local.LocalStore(tmp_path)
    for data in (b"a" * 10, b"b" * 20):
        w = s.writer(str(len(data)))
        w.write(data)
        w.commit(len(data), digests.of(data))
    open_ingest = s.writer("pending")
    open_ingest.write(os.urandom(100))
    open_ingest.close()
    assert s.usage() == 30


def test_ingests_left_by_a_writer_that_died_after_publishing_are_cleaned(tmp_path: Path) -> None:
    s = local.LocalStore(tmp_path)
    w = s.writer("sha256:" + digests.of(b"done").hex)
    w.write(b"done")
    w.commit(4, digests.of(b"done"))
    # The writer died between the rename and removing its ingest: ref and lock are left.
    leftover = tmp_path / "ingest" / "leftover"
    leftover.mkdir()
    (leftover / "ref").write_text(str(digests.of(b"done")))
    (leftover / "lock").touch()
    resumable = s.writer("pending")
    resumable.write(b"half")
    resumable.close()

    assert s.clean_finished_ingests() == [str(digests.of(b"done"))]
    assert [st.ref for st in s.ingests()] == ["pending"]
