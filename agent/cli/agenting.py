"""``prefetcher agent``: run the node agent (the DaemonSet's process) for one node."""

from __future__ import annotations

import argparse
from typing import Any

from agent import config, logs


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the node agent: pull what the operator dispatched to this node",
        description=(
            "Watch this node's NodeImageSet (only it), pull its images into the store under"
            " runtime.root, report progress, stalls and results in its status, collect"
            " garbage, and serve /healthz, /readyz and /metrics. Uses the in-cluster service"
            " account, or --kubeconfig / $KUBECONFIG outside a cluster."
        ),
    )
    p.add_argument("--node", help="node name (default: $NODE_NAME, from the Downward API)")
    p.add_argument("--config", help="config file (default: PREFETCHER_CONFIG or /etc/prefetcher)")
    p.add_argument("--root", help="store directory (default: runtime.root)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG)")
    p.add_argument("--namespace", "-n",
                   help="operator namespace holding the pull-secret copies"
                        " (default: $POD_NAMESPACE or prefetcher-system)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    if args.node:
        runtime["node_name"] = args.node
    if args.root:
        runtime["root"] = args.root
    if args.kubeconfig:
        runtime["kubeconfig"] = args.kubeconfig
    if args.namespace:
        runtime["namespace"] = args.namespace
    if args.verbose:
        runtime["log_level"] = "debug"
    return {"runtime": runtime} if runtime else {}


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config, overrides(args))
    except config.ConfigError as e:
        logs.startup_error("agent", str(e), logs.requested_format(args.config))
        return 2
    if not settings.runtime.node_name:
        logs.startup_error("agent", "no node name: pass --node or set NODE_NAME (the chart"
                           " sets it from the Downward API's spec.nodeName)",
                           settings.runtime.log_format)
        return 2
    from agent.cli import pulling
    from agent.node import main  # kopf is imported only when the agent runs

    return main.run(settings, pulling.service_options(settings), verbose=bool(args.verbose))
