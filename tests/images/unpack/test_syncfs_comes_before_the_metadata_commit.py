"""``strace`` a real unpack: per layer, file writes → ``syncfs`` → metadata commit.

The snapshotter's own ``sync_fs`` flushes inline, in the committing thread, which strace can
order; the unpacker's runs in a syncer thread beside the next layers' applies and prepares
(their metadata writes interleave), so its order is checked by instrumenting the calls in
``test_syncfs_does_not_hold_up_the_next_layer.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is missing")

SCRIPT = Path(__file__).with_name("unpacking_process.py")
TRACE = "syncfs,fsync,fdatasync,rename,renameat2,openat,write,pwrite64"


def trace(tmp_path: Path, *args: str) -> list[str]:
    out = tmp_path / "strace.txt"
    root = tmp_path / "root"
    subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-e",
            f"trace={TRACE}",
            "-o",
            str(out),
            sys.executable,
            str(SCRIPT),
            str(root),
            "--files",
            "20",
            *args,
        ],
        check=True,
        capture_output=True,
    )
    return completed(out.read_text().splitlines())


def completed(lines: list[str]) -> list[str]:
    """strace's lines with each call split by another thread's (``<unfinished ...>`` …
    ``<... call resumed>``) joined into one, at the place where it returned."""
    pending: dict[str, str] = {}
    out = []
    for line in lines:
        if m := re.match(r"(\d+) +(.*) <unfinished \.\.\.>$", line):
            pending[m.group(1)] = m.group(2)
        elif (m := re.match(r"(\d+) +<\.\.\. \w+ resumed>(.*)$", line)) and m.group(1) in pending:
            rest = re.sub(r"^\)\s+=", ") =", m.group(2))
            out.append(f"{m.group(1)} {pending.pop(m.group(1))}{rest}")
        else:
            out.append(line)
    return out


def layer_ids(lines: list[str]) -> list[str]:
    return sorted(
        {m.group(1) for line in lines for m in re.finditer(r"/snapshots/(\d+)/fs[/>]", line)}
    )


def first(lines: list[str], start: int, pattern: str) -> int:
    for i in range(start, len(lines)):
        if re.search(pattern, lines[i]):
            return i
    raise AssertionError(f"no line matches {pattern!r} after line {start}")


@pytest.mark.parametrize("where", ["snapshotter"])
def test_each_layer_is_synced_after_its_last_write_and_before_its_commit(
    where: str, tmp_path: Path
) -> None:
    lines = trace(tmp_path, "--sync-fs", where)
    ids = layer_ids(lines)
    assert len(ids) == 3
    for sid in ids:
        writes = [
            i
            for i, line in enumerate(lines)
            if re.search(rf"\bwrite\(\d+</[^>]*/snapshots/{sid}/fs/", line)
        ]
        assert writes, f"no file writes into snapshot {sid}"
        last_write = writes[-1]
        sync = first(lines, last_write, rf"\bsyncfs\(\d+</[^>]*/snapshots/{sid}/fs>\) = 0")
        # The snapshotter flushes in commit(), in the committing thread, then writes the
        # metadata: the commit is that thread's next WAL sync (other threads prepare).
        pid = lines[sync].split()[0]
        commit = first(
            lines, sync, rf"^{pid} +(fsync|fdatasync)\(\d+</[^>]*metadata\.db-wal>"
        )
        assert last_write < sync < commit, (sid, last_write, sync, commit)


def test_without_sync_fs_there_is_no_syncfs(tmp_path: Path) -> None:
    lines = trace(tmp_path)
    assert len(layer_ids(lines)) == 3
    assert [line for line in lines if "syncfs(" in line] == []
    # The metadata is still committed durably (WAL, synchronous=FULL).
    assert any(re.search(r"(fsync|fdatasync)\(\d+</[^>]*metadata\.db-wal>", x) for x in lines)
