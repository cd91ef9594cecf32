"""``scripts/dev-cluster`` as a contributor uses it: start, kubectl with the printed
KUBECONFIG, the sample prefetch completes on the two ``pool=dev`` nodes, ``stop`` from
another shell, and nothing is left running or listening."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fixtures import registries

from tests.kube.cluster import REPO
from tests.kube.processes import wait_until

SCRIPT = REPO / "scripts" / "dev-cluster"

pytestmark = pytest.mark.skipif(not registries.available(),
                                reason=f"{registries.BINARY} is missing")


def kubectl(kubeconfig: str, *args: str) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def test_dev_cluster_runs_the_sample_prefetch_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    log = tmp_path / "dev-cluster.out"
    with log.open("wb") as out:
        process = subprocess.Popen([str(SCRIPT), "--dir", str(state)], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        printed = wait_until(
            lambda: re.search(r"export KUBECONFIG=(\S+)", log.read_text())
            or process.poll() is not None, timeout=120, message="the KUBECONFIG line")
        assert process.poll() is None, log.read_text()
        assert isinstance(printed, re.Match)
        kubeconfig = printed.group(1)
        info = json.loads((state / "dev-cluster.json").read_text())

        nodes = kubectl(kubeconfig, "get", "nodes", "-o", "name").split()
        assert nodes == ["node/dev-a", "node/dev-b", "node/dev-c"]
        kubectl(kubeconfig, "apply", "-f", str(state / "sample-prefetch.yaml"))
        wait_until(lambda: kubectl(kubeconfig, "get", "ipf", "sample", "-n", "default", "-o",
                                   "jsonpath={.status.phase}") == "Complete",
                   timeout=90, interval=0.5, message="the sample prefetch Complete")
        table = kubectl(kubeconfig, "get", "ipf", "sample", "-n", "default")
        assert "2/2" in table and "100%" in table, table

        stop = subprocess.run([str(SCRIPT), "stop", "--dir", str(state)], capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:  # the test failed before the stop: do not leak it
            os.killpg(process.pid, 15)
            process.wait(timeout=60)

    pids = [info["operator"]["pid"], *(a["pid"] for a in info["agents"].values())]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == []
    api = urlsplit(info["api"])
    registry_host, _, registry_port = info["registry"].rpartition(":")
    assert not listening(api.hostname or "", api.port or 0)
    assert not listening(registry_host, int(registry_port))
    assert not (state / "dev-cluster.pid").exists()
    assert "dev-cluster: stopped" in log.read_text()
