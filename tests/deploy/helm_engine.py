"""Run Helm actions through ``helm_sdkpy`` in this process: ``python -m tests.deploy.helm_engine``.

Reads a JSON job on stdin, writes a JSON list of step results on stdout. Run as a child
process by :mod:`tests.deploy.helm` because the Go runtime inside ``helm_sdkpy`` reads its
environment (``HELM_DRIVER=memory``) once, at process start. One job shares one Helm
configuration, so the memory driver keeps the release between install, upgrade and
uninstall steps.

Job: ``{"kubeconfig": path or null, "namespace": str, "steps": [step, ...]}``; a step is
``{"action": "install" | "upgrade" | "uninstall" | "lint", "release": str, "chart": path,
"values": {...}}``. A result is ``{"ok": true, "result": {...}}`` or ``{"ok": false,
"error": "..."}``; the steps after a failure are not run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any


async def _step(config: Any, step: dict[str, Any]) -> Any:
    import helm_sdkpy

    action = step["action"]
    if action == "lint":
        return await helm_sdkpy.Lint(config).run(step["chart"])
    if action == "install":
        return await helm_sdkpy.Install(config).run(
            step["release"], step["chart"], values=step.get("values") or {}, wait=False,
            timeout=60)
    if action == "upgrade":
        return await helm_sdkpy.Upgrade(config).run(
            step["release"], step["chart"], values=step.get("values") or {}, wait=False,
            timeout=60)
    if action == "uninstall":
        return await helm_sdkpy.Uninstall(config).run(step["release"], wait=False)
    raise ValueError(f"unknown action {action!r}")


def main() -> int:
    if os.environ.get("HELM_DRIVER") != "memory":
        print("run with HELM_DRIVER=memory in the environment", file=sys.stderr)
        return 2
    import helm_sdkpy

    job = json.load(sys.stdin)
    config = helm_sdkpy.Configuration(namespace=job.get("namespace") or "default",
                                      kubeconfig=job.get("kubeconfig"))
    results: list[dict[str, Any]] = []
    for step in job["steps"]:
        try:
            results.append({"ok": True, "result": asyncio.run(_step(config, step))})
        except Exception as e:  # the error text is what a failing test shows
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
            break
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
