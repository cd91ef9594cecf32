"""An ``ImageService`` that cannot start closes what it had opened: its backend (handed in,
or its own), the store's lock and the records database.

A leaked shared lock is what a user notices: every later garbage collection of that store
(``prefetcher gc``, the agent's next collection in the same process) is refused as "in use
by another prefetcher process" for as long as the process lives.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.images import backends, errors, service
from agent.images.registry import client, hosts


def open_fds() -> set[str]:
    """The files this process has open (``/proc/self/fd`` targets), but the listing's own."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
    return found


def lock_is_free(root: Path) -> bool:
    """Whether the store's lock can be taken exclusively (flock conflicts between open file
    descriptions even within one process, so a leaked shared lock shows here)."""
    fd = os.open(root / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class Watched(backends.LocalBackend):
    """The naive local backend, noting whether it was closed; ``cleanup_error`` makes its
    start-up cleanup fail (as a runtime that stops answering at that moment would)."""

    def __init__(self, root: Path, cleanup_error: Exception | None = None):
        inner = backends.open_store(root, "naive")
        super().__init__(inner.store_snapshotter, "naive")
        self.cleanup_error = cleanup_error
        self.closed = False

    def cleanup(self) -> None:
        if self.cleanup_error is not None:
            raise self.cleanup_error
        super().cleanup()

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture
def registry() -> Iterator[client.RegistryClient]:
    yield client.RegistryClient(hosts.RegistryHosts(None))


def under(root: Path, paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith(str(root))}


def test_an_unreadable_records_database_closes_the_backend_and_the_lock(
    tmp_root: Path, registry: client.RegistryClient
) -> None:
    (tmp_root / "images.db").mkdir()  # sqlite cannot open a directory
    backend = Watched(tmp_root)
    before = open_fds()

    with pytest.raises(Exception, match="unable to open database"):
        service.ImageService(tmp_root, registry, backend=backend)

    assert backend.closed
    assert under(tmp_root, open_fds() - before) == set()
    assert lock_is_free(tmp_root), "the store stays locked after a refused start"


def test_a_failing_start_up_cleanup_closes_records_backend_and_lock(
    tmp_root: Path, registry: client.RegistryClient
) -> None:
    backend = Watched(tmp_root, cleanup_error=errors.Unavailable("the runtime went away"))
    before = open_fds()

    with pytest.raises(errors.Unavailable, match="went away"):
        service.ImageService(tmp_root, registry, backend=backend)

    assert backend.closed
    assert under(tmp_root, open_fds() - before) == set(), "records database left open"
    assert lock_is_free(tmp_root)
    # The store is usable afterwards, by this process too.
    svc = service.ImageService(tmp_root, registry, backend=backends.open_store(tmp_root, "naive"))
    svc.close()
    assert lock_is_free(tmp_root)


def test_a_corrupt_records_file_leaves_no_connection_open(
    tmp_root: Path, registry: client.RegistryClient
) -> None:
    (tmp_root / "images.db").write_bytes(b"not a database, " * 512)
    before = open_fds()

    with pytest.raises(Exception, match="not a database"):
        service.ImageService(tmp_root, registry, backend=Watched(tmp_root))

    assert under(tmp_root, open_fds() - before) == set()
    assert lock_is_free(tmp_root)
