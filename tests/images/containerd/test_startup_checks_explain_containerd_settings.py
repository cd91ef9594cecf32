"""The start-up checks explain, before any import, what would make prefetching into this
containerd useless or unsafe; the snapshotter maps containerd's errors to the service's."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.images import containerd, errors
from agent.images.containerd import checks

from .conftest import Containerd

pytestmark = pytest.mark.root


def test_a_well_configured_containerd_passes(ctrd: Containerd) -> None:
    backend = ctrd.backend()
    try:
        report = backend.start()
    finally:
        backend.close()
    assert report.ok and report.findings == ()
    assert report.version.startswith(("1.", "2."))
    assert (report.cri, report.cri_snapshotter, report.discard_unpacked_layers) == (
        True, "overlayfs", False,
    )


def test_an_unreachable_socket_is_one_clear_error(tmp_path: Path) -> None:
    backend = containerd.ContainerdBackend(str(tmp_path / "missing.sock"))
    try:
        report = backend.check()
        with pytest.raises(errors.InvalidConfiguration, match="not reachable at .*missing.sock"):
            report.raise_for_errors()
    finally:
        backend.close()
    assert "is the socket mounted?" in report.messages("error")[0]


def test_another_snapshotter_than_the_cris_is_refused(ctrd: Containerd) -> None:
    backend = ctrd.backend(snapshotter="native")
    try:
        report = backend.check()
    finally:
        backend.close()
    (message,) = report.messages("error")
    assert "unpacks into the 'overlayfs' snapshotter" in message
    assert "snapshotter = 'overlayfs'" in message


def test_a_missing_snapshotter_plugin_is_refused(ctrd: Containerd) -> None:
    backend = ctrd.backend(snapshotter="zfs")
    try:
        messages = backend.check().messages("error")
    finally:
        backend.close()
    assert any("has no 'zfs' snapshotter (it has: native, overlayfs)" in m for m in messages)


def test_a_namespace_the_cri_does_not_read_is_a_warning(ctrd: Containerd) -> None:
    backend = ctrd.backend(namespace="default")
    try:
        report = backend.check()
    finally:
        backend.close()
    assert report.ok
    (warning,) = report.messages("warning")
    assert "only sees 'k8s.io'" in warning


@pytest.mark.parametrize(
    ("version", "level"), [("1.5.9", "warning"), ("1.6.20~ds1", None), ("2.1.0", "info")]
)
def test_versions_outside_the_tested_range_are_explained(version: str, level: str | None) -> None:
    found = list(checks._version_findings(version))
    assert [f.level for f in found] == ([level] if level else [])
    if version.startswith("2."):
        assert "transfer service" in found[0].message


def test_containerds_errors_map_onto_the_service_tree(
    ctrd: Containerd, backend: containerd.ContainerdBackend
) -> None:
    sn = backend.snapshotter
    with pytest.raises(errors.NotFound, match="does not exist"):
        sn.stat("sha256:" + "0" * 64)
    with pytest.raises(errors.NotFound):
        sn.prepare("extract-test parent-missing", "sha256:" + "1" * 64)
    with backend.leases.held() as lease:
        leased = sn.with_lease(lease)
        leased.prepare("test-active-a", "")
        with pytest.raises(errors.AlreadyExists):
            leased.prepare("test-active-a", "")
        leased.commit("test-committed-a", "test-active-a")
        leased.prepare("test-active-b", "test-committed-a")
        with pytest.raises(errors.Unavailable):
            leased.remove("test-committed-a")  # it has a child
        assert leased.mounts("test-committed-a")[0].options[0] == "ro"
        leased.remove("test-active-b")
        leased.remove("test-committed-a")
