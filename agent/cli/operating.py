"""``prefetcher operator``: run the cluster operator (kopf; one active replica: the holder of
a leader-election Lease)."""

from __future__ import annotations

import argparse
from typing import Any

from agent import config, logs


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "operator",
        help="run the cluster operator (ImagePrefetch → NodeImageSets, agent DaemonSet)",
        description=(
            "Watch ImagePrefetches in every namespace, write each selected node's"
            " NodeImageSet entries, copy pull secrets into the operator namespace, aggregate"
            " node progress into status and keep the agents' DaemonSet. Uses the in-cluster"
            " service account, or --kubeconfig / $KUBECONFIG outside a cluster."
        ),
    )
    p.add_argument("--config", help="config file (default: PREFETCHER_CONFIG or /etc/prefetcher)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG)")
    p.add_argument("--context", help="kubeconfig context (default: its current context)")
    p.add_argument("--namespace", "-n",
                   help="operator namespace for secret copies and the agent DaemonSet"
                        " (default: $POD_NAMESPACE or prefetcher-system)")
    p.add_argument("--standalone", action="store_true", default=None,
                   help="no leader election: assume this is the only replica")
    p.add_argument("--peering", metavar="NAME",
                   help="name of the Lease (in the operator namespace) replicas elect through")
    p.add_argument("--agent-daemonset", metavar="FILE",
                   help="DaemonSet manifest of the node agents to create and keep")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    operator: dict[str, Any] = {}
    if args.kubeconfig:
        runtime["kubeconfig"] = args.kubeconfig
    if args.context:
        runtime["kube_context"] = args.context
    if args.namespace:
        runtime["namespace"] = args.namespace
    if args.verbose:
        runtime["log_level"] = "debug"
    if args.standalone is not None:
        operator["standalone"] = args.standalone
    if args.peering:
        operator["peering_name"] = args.peering
    if args.agent_daemonset:
        operator["agent_daemonset"] = args.agent_daemonset
    return {k: v for k, v in {"runtime": runtime, "operator": operator}.items() if v}


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config, overrides(args))
    except config.ConfigError as e:
        logs.startup_error("operator", str(e), logs.requested_format(args.config))
        return 2
    from agent.operator import main  # kopf is imported only when the operator runs

    return main.run(settings, verbose=bool(args.verbose))
