"""The emulator served over real HTTP on loopback from a background thread, plus kubectl.

The emulator runs its own event loop in a thread so that tests can be plain synchronous
functions that run ``kubectl`` and the operator as subprocesses (a blocking
``subprocess.run`` in the test would otherwise freeze a same-loop server). Direct access to
the store goes through :meth:`Cluster.call`, which runs a function on the emulator's loop.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from .emulator import Call, KubeAPI, kubeconfig

T = TypeVar("T")
JSON = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"


class Cluster:
    """One emulated API server: ``with Cluster(tmp) as c: c.kubectl("get", "nodes")``."""

    def __init__(self, workdir: Path, **options: Any) -> None:
        self.workdir = workdir
        self.options = options
        self.kubeconfig_path = workdir / "kubeconfig"
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.api: KubeAPI | None = None

    def __enter__(self) -> Cluster:
        ready: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="kube-emulator")
        self._thread.start()
        self.url = ready.result(timeout=10)
        self.kubeconfig_path.write_text(kubeconfig(self.url))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, ready: Future[str]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with KubeAPI(**self.options) as api, kmock.Server(api) as server:
                self.api = api
                ready.set_result(f"http://{server.host}:{server.port}")
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as e:  # pragma: no cover - surfaces start-up failures
            if not ready.done():
                ready.set_exception(e)
            raise

    # Direct access (runs on the emulator's loop).

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._loop is not None and self.api is not None
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def get(self, api_version: str, plural: str, name: str, namespace: str = "") -> JSON | None:
        assert self.api is not None
        return self.call(self.api.get_object, api_version, plural, name, namespace)

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[JSON]:
        assert self.api is not None
        return self.call(self.api.list_objects, api_version, plural, namespace)

    def put(self, api_version: str, plural: str, obj: JSON) -> JSON:
        assert self.api is not None
        return self.call(self.api.put_object, api_version, plural, obj)

    def delete(self, api_version: str, plural: str, name: str, namespace: str = "") -> None:
        assert self.api is not None
        self.call(self.api.delete_object, api_version, plural, name, namespace)

    def before(self, verb: str, plural: str, action: Callable[[KubeAPI], None], *,
               name: str = "", subresource: str = "") -> None:
        """Run ``action(api)`` on the emulator's loop just before the next matching request
        is served (see :meth:`KubeAPI.before`)."""
        api = self.api
        assert api is not None
        self.call(api.before, verb, plural, lambda: action(api), name=name,
                  subresource=subresource)

    def history(self) -> builtins.list[tuple[str, JSON]]:
        """Every watch event kept so far, oldest first: ``(type, object)``."""
        api = self.api
        assert api is not None
        return self.call(lambda: [(e[2], e[3]) for e in api._events])

    def calls(self) -> list[Call]:
        assert self.api is not None
        return self.call(lambda: list(self.api.calls))  # type: ignore[union-attr]

    # Convenience.

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig_path)
        env.pop("PREFETCHER_CONFIG", None)
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run the real ``kubectl`` against this emulator."""
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig_path}", *args], input=input,
            capture_output=True, text=True, timeout=timeout, env=self.env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def apply(self, *documents: JSON | str) -> subprocess.CompletedProcess[str]:
        text = "\n---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in documents)
        return self.kubectl("apply", "-f", "-", input=text)

    def install_crds(self) -> None:
        self.kubectl("apply", "-f", str(CRDS))

    def add_node(self, name: str, labels: dict[str, str] | None = None, *, ready: bool = True,
                 unschedulable: bool = False) -> JSON:
        node: JSON = {
            # The labels every kubelet sets on its Node (the chart's agents select on os).
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "kubernetes.io/os": "linux",
                                                  "kubernetes.io/arch": "amd64",
                                                  **(labels or {})}},
            "spec": {"unschedulable": True} if unschedulable else {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "reason": "KubeletReady"}]},
        }
        return self.put("v1", "nodes", node)

    def renew_heartbeat(self, node: str, namespace: str) -> JSON:
        """Renew ``node``'s agent heartbeat Lease in ``namespace`` as its agent would."""
        from agent.kube import leases

        name = leases.heartbeat_name(node)
        lease = self.get(leases.API_VERSION, "leases", name, namespace) or {
            "metadata": {"name": name, "namespace": namespace,
                         "labels": leases.heartbeat_labels(),
                         "annotations": {leases.NODE_ANNOTATION: node}}}
        lease["spec"] = {"holderIdentity": f"agent-{node}", "leaseDurationSeconds": 40,
                         "renewTime": leases.micro_time()}
        return self.put(leases.API_VERSION, "leases", lease)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 20,
                 interval: float = 0.1, message: str = "") -> T:
        """Poll until ``predicate()`` is truthy; return its value or fail with ``message``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s: {message or predicate!r}; last={last!r}")


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
