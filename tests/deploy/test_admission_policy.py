"""The ValidatingAdmissionPolicy that confines each agent to its own node's NodeImageSet,
evaluated with a CEL interpreter on the requests an API server would hand it."""

from __future__ import annotations

from typing import Any

import celpy
import pytest

from agent.kube import leases

from .conftest import NAMESPACE, RELEASE, Release

NODE_KEY = "authentication.kubernetes.io/node-name"
AGENT = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-image-prefetcher-agent"
JSON = dict[str, Any]


def evaluate(expression: str, request: JSON) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return program.evaluate({"request": celpy.json_to_cel(request)})


def admission_request(user: str, name: str, node: str | None, operation: str = "UPDATE",
                      subresource: str = "status", lease: bool = False) -> JSON:
    extra = {NODE_KEY: [node]} if node is not None else {}
    resource = {"group": "coordination.k8s.io", "version": "v1", "resource": "leases"} \
        if lease else {"group": "prefetcher.dev", "version": "v1alpha1",
                       "resource": "nodeimagesets"}
    return {"operation": operation, "name": name, "subResource": "" if lease else subresource,
            "resource": resource,
            "userInfo": {"username": user, "groups": ["system:serviceaccounts"],
                         "extra": extra}}


def admits(policy: JSON, request: JSON) -> bool:
    """The policy's verdict: allowed unless it matches and a validation fails."""
    spec = policy["spec"]
    if not all(evaluate(c["expression"], request) for c in spec.get("matchConditions") or []):
        return True
    return all(bool(evaluate(v["expression"], request)) for v in spec["validations"])


@pytest.fixture(scope="module")
def policy(release: Release) -> JSON:
    return release.get("ValidatingAdmissionPolicy")


def test_the_policy_covers_every_write_to_node_image_sets(policy: JSON, release: Release) -> None:
    spec = policy["spec"]
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert spec["failurePolicy"] == "Fail"
    rule, leases = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["prefetcher.dev"]
    assert set(rule["resources"]) == {"nodeimagesets", "nodeimagesets/status"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    assert leases["apiGroups"] == ["coordination.k8s.io"] and leases["resources"] == ["leases"]
    assert set(leases["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    binding = release.get("ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]


@pytest.mark.parametrize(("user", "name", "node", "allowed"), [
    (AGENT, "node-a", "node-a", True),             # its own node
    (AGENT, "node-b", "node-a", False),            # another node's work
    (AGENT, "node-a", None, False),                # a token without a node (not pod-bound)
    ("system:serviceaccount:prefetcher:ipf-image-prefetcher-operator", "node-b", None, True),
    (f"system:serviceaccount:other:{RELEASE}-image-prefetcher-agent", "node-b", "x", True),
])
def test_an_agent_writes_only_its_own_node(policy: JSON, user: str, name: str,
                                           node: str | None, allowed: bool) -> None:
    assert admits(policy, admission_request(user, name, node)) is allowed


def test_the_denial_names_the_node(policy: JSON) -> None:
    [validation] = policy["spec"]["validations"]
    message = evaluate(validation["messageExpression"],
                       admission_request(AGENT, "node-b", "node-a"))
    assert str(message) == "the image-prefetcher agent of node node-a may not write " \
                           "NodeImageSet node-b"
    assert validation["reason"] == "Forbidden"


LONG_NODE = "n" * 240  # its heartbeat Lease name is hashed (over 253 characters otherwise)


@pytest.mark.parametrize(("user", "name", "node", "allowed"), [
    (AGENT, leases.heartbeat_name("node-a"), "node-a", True),       # its own heartbeat
    (AGENT, leases.heartbeat_name("node-b"), "node-a", False),      # another node's
    (AGENT, f"{RELEASE}-image-prefetcher", "node-a", False),        # the operator's leader Lease
    (AGENT, "prefetcher", "node-a", False),
    (AGENT, leases.heartbeat_name("node-a"), None, False),          # a token without a node
    (AGENT, leases.heartbeat_name(LONG_NODE), LONG_NODE, True),     # hashed: still its own
    ("system:serviceaccount:prefetcher:ipf-image-prefetcher-operator", "prefetcher", None, True),
])
def test_an_agent_renews_only_its_own_heartbeat_lease(policy: JSON, user: str, name: str,
                                                      node: str | None, allowed: bool) -> None:
    assert admits(policy, admission_request(user, name, node, lease=True)) is allowed


def test_a_lease_denial_names_the_lease(policy: JSON) -> None:
    [validation] = policy["spec"]["validations"]
    message = evaluate(validation["messageExpression"],
                       admission_request(AGENT, "prefetcher", "node-a", lease=True))
    assert str(message) == "the image-prefetcher agent of node node-a may not write Lease " \
                           "prefetcher"
