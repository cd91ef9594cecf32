"""``strace`` a real unpack: per layer, file writes → ``syncfs`` → metadata commit."""

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
    return out.read_text().splitlines()


def layer_ids(lines: list[str]) -> list[str]:
    return sorted(
        {m.group(1) for line in lines for m in re.finditer(r"/snapshots/(\d+)/fs[/>]", line)}
    )


def first(lines: list[str], start: int, pattern: str) -> int:
    for i in range(start, len(lines)):
        if re.search(pattern, lines[i]):
            return i
    raise AssertionError(f"no line matches {pattern!r} after line {start}")


@pytest.mark.parametrize("where", ["unpacker", "snapshotter"])
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
        commit = first(lines, last_write, r"\b(fsync|fdatasync)\(\d+</[^>]*metadata\.db-wal>")
        assert last_write < sync < commit, (sid, last_write, sync, commit)


def test_without_sync_fs_there_is_no_syncfs(tmp_path: Path) -> None:
    lines = trace(tmp_path)
    assert len(layer_ids(lines)) == 3
    assert [line for line in lines if "syncfs(" in line] == []
    # The metadata is still committed durably (WAL, synchronous=FULL).
    assert any(re.search(r"(fsync|fdatasync)\(\d+</[^>]*metadata\.db-wal>", x) for x in lines)
