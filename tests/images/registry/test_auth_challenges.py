"""WWW-Authenticate parsing, as registries send it."""

from __future__ import annotations

import pytest

from agent.images.registry import auth


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [("bearer", {"realm": "https://auth.docker.io/token",
                         "service": "registry.docker.io",
                         "scope": "repository:library/alpine:pull"})],
        ),
        ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="x", Bearer realm="https://t/token",service=reg',
            [("basic", {"realm": "x"}), ("bearer", {"realm": "https://t/token", "service": "reg"})],
        ),
        ('Bearer realm="a \\"quoted\\" realm"', [("bearer", {"realm": 'a "quoted" realm'})]),
        ("", []),
    ],
)
def test_challenges_are_parsed_with_their_parameters(
    header: str, expected: list[tuple[str, dict[str, str]]]
) -> None:
    got = [(c.scheme, c.params) for c in auth.parse_challenges(header)]
    assert got == expected
