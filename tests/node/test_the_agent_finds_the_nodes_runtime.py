"""``images.snapshotter = "auto"``: at start the agent finds the node's runtime — a real
containerd 1.6 (with its CRI plugin) at a non-default socket, or a CRI runtime — or refuses
to start, naming every place it looked.

The well-known socket paths (``/run/containerd/containerd.sock``, …) are replaced by paths
under the test's directory: the host running the tests may or may not have a containerd of
its own there, and the tests must not depend on, or touch, it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config, runtimes
from agent.images import errors
from tests.images.containerd.conftest import Containerd, ctrd

__all__ = ["ctrd"]


@pytest.fixture(autouse=True)
def no_well_known_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    containerd = [str(tmp_path / "run/containerd/containerd.sock"),
                  str(tmp_path / "run/k3s/containerd/containerd.sock")]
    cri = [str(tmp_path / "var/run/crio/crio.sock")]
    monkeypatch.setattr(runtimes, "CONTAINERD_SOCKETS", tuple(containerd))
    monkeypatch.setattr(runtimes, "CRI_SOCKETS", tuple(cri))
    monkeypatch.setattr(runtimes, "CONTAINERD_CONFIGS", ())
    return containerd + cri


def settings(tmp_path: Path, images: str = "") -> config.Settings:
    path = tmp_path / "agent.toml"
    path.write_text(f'[runtime]\nroot = "{tmp_path / "root"}"\n{images}')
    return config.load(str(path), {})


def test_with_no_runtime_the_agent_refuses_to_start_naming_every_path(
    tmp_path: Path, no_well_known_sockets: list[str]
) -> None:
    not_a_socket = Path(no_well_known_sockets[0])
    not_a_socket.parent.mkdir(parents=True)
    not_a_socket.write_text("")  # a file where the socket should be
    with pytest.raises(errors.InvalidConfiguration) as caught:
        runtimes.open_runtime(settings(tmp_path), default="auto")
    message = str(caught.value)
    assert 'images.snapshotter = "auto" found no container runtime' in message
    for path in no_well_known_sockets:
        assert f"{path} (no socket)" in message
    assert "images.containerd.address" in message and '"overlayfs"' in message


def test_the_cli_default_stays_the_private_store(tmp_path: Path) -> None:
    runtime = runtimes.open_runtime(settings(tmp_path))
    try:
        assert runtime.backend.info.to_json() == {
            "mode": "local", "runtime": "", "version": "", "address": "",
            "snapshotter": "overlayfs", "namespace": "", "byteProgress": True,
            "pinning": False,
        }
    finally:
        runtime.backend.close()


@pytest.mark.root
def test_auto_finds_containerd_at_the_configured_socket_with_its_cri_settings(
    tmp_path: Path, ctrd: Containerd
) -> None:
    # The snapshotter and namespace configured are not the CRI plugin's: auto follows the
    # CRI plugin (overlayfs, k8s.io), as kubelet's pulls do.
    runtime = runtimes.open_runtime(settings(tmp_path, (
        f'[images.containerd]\naddress = "{ctrd.address}"\nsnapshotter = "native"\n'
        'namespace = "default"\n'
    )), default="auto")
    try:
        info = runtime.backend.info
        assert (info.mode, info.runtime, info.address) == ("containerd", "containerd",
                                                           ctrd.address)
        assert (info.snapshotter, info.namespace) == ("overlayfs", "k8s.io")
        assert info.version.startswith("1.6")
        # The hosts directory is the one the running containerd's CRI plugin reads.
        assert runtime.hosts_dir == str(ctrd.base / "certs.d")
    finally:
        runtime.backend.close()


@pytest.mark.root
def test_auto_falls_back_to_a_cri_runtime_when_no_containerd_answers(
    tmp_path: Path, ctrd: Containerd
) -> None:
    # containerd's CRI endpoint stands in for CRI-O here: what auto asks it is CRI only.
    runtime = runtimes.open_runtime(
        settings(tmp_path, f'[images.cri]\naddress = "{ctrd.address}"\n'), default="auto"
    )
    try:
        info = runtime.backend.info
        assert (info.mode, info.runtime, info.byte_progress) == ("cri", "containerd", False)
        assert info.address == ctrd.address
    finally:
        runtime.backend.close()
