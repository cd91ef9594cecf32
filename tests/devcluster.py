"""``scripts/dev-cluster``: the whole system on one machine, no Kubernetes needed.

What the end-to-end tests run, kept up for a person with ``kubectl``: the API emulator
(``tests/kube``) with the CRDs and three Nodes (``dev-a``, ``dev-b`` with ``pool=dev``,
``dev-c`` with ``pool=other``), Debian's ``docker-registry`` on loopback with a sample image
(``<registry>/sample/app:1``), one ``prefetcher operator`` and three ``prefetcher agent``
processes (the e2e fixtures' configs: short intervals, each agent with its own store root
and free health/metrics ports).

``start`` (the default) runs in the foreground, prints the ``KUBECONFIG`` to use and
what runs where, and stops everything on Ctrl-C / SIGTERM or ``scripts/dev-cluster stop``
(from another shell), agents first, then the operator, the registry and the API. Its state
(kubeconfig, logs, stores, registry data) is in ``--dir`` (default
``/tmp/prefetcher-dev-cluster``), emptied at each start and left for reading after a stop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the fixtures' own imports (``from fixtures import …``)
    sys.path.insert(0, str(TESTS))

from fixtures import images, registries  # noqa: E402

from tests.e2e.conftest import OPERATOR_CONFIG, OPERATOR_NAMESPACE, Agent  # noqa: E402
from tests.kube.cluster import Cluster  # noqa: E402
from tests.kube.processes import PREFETCHER, Process, wait_until  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("PREFETCHER_DEV_CLUSTER_DIR", "/tmp/prefetcher-dev-cluster"))
NODES = {"dev-a": {"pool": "dev"}, "dev-b": {"pool": "dev"}, "dev-c": {"pool": "other"}}
SAMPLE_REPOSITORY = "sample/app"
PID_FILE = "dev-cluster.pid"
INFO_FILE = "dev-cluster.json"


def sample_image() -> images.Image:
    """A small two-layer image (a file tree and 1 MB of random bytes in a few files)."""
    return images.Image([images.layer({"etc/motd": "hello from the dev cluster\n",
                                       "bin/": b""}),
                         images.random_layer(1_000_000, files=8, seed=2024)])


def sample_prefetch(reference: str) -> str:
    return f"""\
apiVersion: prefetcher.dev/v1alpha1
kind: ImagePrefetch
metadata:
  name: sample
  namespace: default
spec:
  images:
    - {reference}
  nodeSelector:
    matchLabels:
      pool: dev
"""


class DevCluster:
    """Everything, started in order by :meth:`start`, stopped in reverse by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        self.cluster: Cluster | None = None
        self.registry: registries.Registry | None = None
        self.operator: Process | None = None
        self.agents: dict[str, Agent] = {}

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        (self.workdir / "api").mkdir()
        cluster = self._stack.enter_context(Cluster(self.workdir / "api"))
        self.cluster = cluster
        cluster.install_crds()
        cluster.put("v1", "namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        for node, labels in NODES.items():
            cluster.add_node(node, labels)
        if not registries.available():
            raise SystemExit(f"{registries.BINARY} is missing: scripts/setup installs it")
        registry_dir = self.workdir / "registry"
        registry_dir.mkdir()
        self.registry = self._stack.enter_context(registries.start_registry(registry_dir, "none"))
        images.push(self.registry, SAMPLE_REPOSITORY, "1", sample_image())

        operator_dir = self.workdir / "operator"
        operator_dir.mkdir()
        (operator_dir / "config.toml").write_text(OPERATOR_CONFIG)
        self.operator = Process(
            [PREFETCHER, "operator", "--config", str(operator_dir / "config.toml"),
             "--kubeconfig", str(cluster.kubeconfig_path)],
            operator_dir / "operator.log", cluster.env())
        self._stack.callback(self.operator.stop)
        self.operator.start().wait_for_output("Activity 'configure' succeeded", timeout=60)

        for node in NODES:
            node_dir = self.workdir / node
            node_dir.mkdir()
            agent = Agent(cluster, node, node_dir)
            if os.geteuid() != 0:  # overlay snapshots need root; plain copies do not
                agent.process.env["PREFETCHER_IMAGES__SNAPSHOTTER"] = "naive"
            self.agents[node] = agent
            self._stack.callback(agent.process.stop)
            agent.process.start()
        for agent in self.agents.values():
            wait_until(agent.ready, timeout=60, message=f"agent {agent.node} ready")

    def stop(self) -> None:
        self._stack.close()  # in reverse: agents, operator, registry, API

    @property
    def sample_reference(self) -> str:
        assert self.registry is not None
        return f"{self.registry.host}/{SAMPLE_REPOSITORY}:1"

    def info(self) -> dict[str, object]:
        assert self.cluster is not None and self.registry is not None
        assert self.operator is not None
        return {
            "pid": os.getpid(),
            "kubeconfig": str(self.cluster.kubeconfig_path),
            "api": self.cluster.url,
            "registry": self.registry.host,
            "sample_image": self.sample_reference,
            "operator": {"pid": self.operator.pid, "log": str(self.operator.log)},
            "agents": {node: {"pid": a.process.pid, "log": str(a.process.log),
                              "root": str(a.root),
                              "health": f"http://127.0.0.1:{a.health_port}/readyz",
                              "metrics": f"http://127.0.0.1:{a.metrics_port}/metrics"}
                       for node, a in self.agents.items()},
        }


def banner(info: dict[str, object], workdir: Path) -> str:
    agents = info["agents"]
    assert isinstance(agents, dict)
    lines = [
        "dev cluster ready.",
        "",
        f"  export KUBECONFIG={info['kubeconfig']}",
        "  kubectl get nodes",
        f"  kubectl apply -f {workdir / 'sample-prefetch.yaml'}",
        "  kubectl get imageprefetches -A -w",
        "",
        f"API server:  {info['api']}",
        f"registry:    {info['registry']} (sample image {info['sample_image']})",
        f"operator:    log {info['operator']['log']}",  # type: ignore[index]
    ]
    for node, agent in agents.items():
        lines.append(f"agent {node}: log {agent['log']}, {agent['health']}, {agent['metrics']}")
    lines += ["", "Stop: Ctrl-C here, or scripts/dev-cluster stop"]
    return "\n".join(lines)


@contextlib.contextmanager
def pid_file(workdir: Path) -> Iterator[None]:
    path = workdir / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def running_pid(workdir: Path) -> int | None:
    try:
        pid = int((workdir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def start(workdir: Path) -> int:
    if running_pid(workdir) is not None:
        print(f"dev-cluster: already running ({workdir / PID_FILE}); "
              "scripts/dev-cluster stop first", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    dev = DevCluster(workdir)
    with pid_file(workdir):
        print(f"dev-cluster: starting in {workdir} …", flush=True)
        dev.start()
        try:
            info = dev.info()
            (workdir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            (workdir / "sample-prefetch.yaml").write_text(sample_prefetch(dev.sample_reference))
            print(banner(info, workdir), flush=True)
            while not stop_requested.wait(1.0):
                for name, process in [("operator", dev.operator),
                                      *((n, a.process) for n, a in dev.agents.items())]:
                    if process is not None and not process.running():
                        print(f"dev-cluster: {name} exited; see {process.log}", file=sys.stderr)
                        stop_requested.set()
        finally:
            print("dev-cluster: stopping …", flush=True)
            dev.stop()
    print("dev-cluster: stopped", flush=True)
    return 0


def stop(workdir: Path, timeout: float = 60) -> int:
    pid = running_pid(workdir)
    if pid is None:
        print(f"dev-cluster: not running (no live pid in {workdir / PID_FILE})")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(workdir) is None:
            print("dev-cluster: stopped")
            return 0
        time.sleep(0.2)
    print(f"dev-cluster: pid {pid} still running after {timeout:.0f}s", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/dev-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="start", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"state directory (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    workdir = args.dir.resolve()
    return start(workdir) if args.command == "start" else stop(workdir)


if __name__ == "__main__":
    sys.exit(main())
