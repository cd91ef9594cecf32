"""A ``prefetcher agent`` whose configured runtime is missing exits at once, with status 2
and a message naming the socket, before it serves probes or talks to the API server."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.kube.processes import PREFETCHER

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_a_missing_containerd_socket_stops_the_agent_with_its_path(tmp_path: Path) -> None:
    socket = tmp_path / "run/containerd/containerd.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[runtime]\nroot = "{tmp_path / "root"}"\nhealth_address = ""\nmetrics_address = ""\n'
        f'[images]\nsnapshotter = "containerd"\n[images.containerd]\naddress = "{socket}"\n'
    )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    agent = subprocess.run(
        [PREFETCHER, "agent", "--config", str(config), "--kubeconfig", str(kubeconfig),
         "--node", "n1"],
        capture_output=True, text=True, timeout=60,
    )
    assert agent.returncode == 2, agent.stderr
    assert f"prefetcher agent: containerd cannot take prefetched images: containerd is not" \
           f" reachable at {socket}" in agent.stderr
    assert "Traceback" not in agent.stderr
