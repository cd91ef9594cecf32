"""Platforms normalise, match and select the way containerd's ``platforms`` package does."""

from __future__ import annotations

import pytest

from agent.images import descriptors, digests, errors, mediatypes, platforms

P = descriptors.Platform


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", P("linux", "amd64")),
        ("linux/x86_64", P("linux", "amd64")),
        ("linux/amd64/v1", P("linux", "amd64")),
        ("linux/amd64/v3", P("linux", "amd64", "v3")),
        ("linux/arm64", P("linux", "arm64")),
        ("linux/arm64/v8", P("linux", "arm64")),
        ("linux/aarch64", P("linux", "arm64")),
        ("linux/arm", P("linux", "arm", "v7")),
        ("linux/arm/v7", P("linux", "arm", "v7")),
        ("linux/arm/7", P("linux", "arm", "v7")),
        ("linux/arm/v6", P("linux", "arm", "v6")),
        ("linux/armhf", P("linux", "arm", "v7")),
        ("linux/armel", P("linux", "arm", "v6")),
        ("linux/i386", P("linux", "386")),
        ("Linux/AMD64", P("linux", "amd64")),
        ("macos/arm64", P("darwin", "arm64")),
        ("arm64", P("linux", "arm64")),
        ("s390x", P("linux", "s390x")),
        ("linux/ppc64le", P("linux", "ppc64le")),
        ("windows/amd64", P("windows", "amd64")),
    ],
)
def test_platform_texts_parse_to_the_normalised_platform(text, expected):
    assert platforms.parse(text) == expected


def test_a_bare_os_takes_this_hosts_architecture():
    host = platforms.default()
    assert platforms.parse("linux") == host
    assert platforms.parse("windows").architecture == host.architecture


@pytest.mark.parametrize("text", ["", "/", "linux/", "/amd64", "a/b/c/d", "linux/amd 64", "l!nux"])
def test_junk_is_an_invalid_platform_naming_the_text(text):
    with pytest.raises(errors.InvalidReference, match="invalid platform") as err:
        platforms.parse(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", P("linux", "amd64")),
        ("aarch64", P("linux", "arm64")),
        ("arm64", P("linux", "arm64")),
        ("armv7l", P("linux", "arm", "v7")),
        ("armv6l", P("linux", "arm", "v6")),
        ("i686", P("linux", "386")),
        ("riscv64", P("linux", "riscv64")),
    ],
)
def test_the_default_platform_is_linux_on_the_normalised_host_machine(
    monkeypatch, machine, expected
):
    monkeypatch.setattr(platforms._host, "machine", lambda: machine)
    assert platforms.default() == expected


@pytest.mark.parametrize(
    ("want", "have", "ok"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux/x86_64", True),
        ("linux/amd64", "linux/amd64/v3", True),  # the variant is ignored unless asked for
        ("linux/amd64/v3", "linux/amd64", True),
        ("linux/amd64/v3", "linux/amd64/v2", True),
        ("linux/amd64/v2", "linux/amd64/v3", False),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64/v8", "linux/arm64", True),
        ("linux/arm/v7", "linux/arm", True),
        ("linux/arm", "linux/arm/v7", True),
        ("linux/arm/v7", "linux/arm/v6", True),
        ("linux/arm/v7", "linux/arm/v5", True),
        ("linux/arm/v6", "linux/arm/v7", False),
        ("linux/arm64", "linux/amd64", False),
        ("linux/amd64", "windows/amd64", False),
        ("linux/arm64", "linux/arm/v7", False),
    ],
)
def test_matching_accepts_compatible_platforms_only(want, have, ok):
    assert platforms.matches(platforms.parse(want), P(*have.split("/"))) is ok


def _index(*entries: str | None) -> descriptors.Index:
    manifests = []
    for i, entry in enumerate(entries):
        platform = None
        if entry is not None:
            platform = P(*entry.split("/"))
        manifests.append(
            descriptors.Descriptor(
                media_type=mediatypes.OCI_MANIFEST,
                digest=digests.Digest("sha256:" + f"{i:x}" * 64),
                size=100 + i,
                platform=platform,
            )
        )
    return descriptors.Index(media_type=mediatypes.OCI_INDEX, manifests=tuple(manifests))


@pytest.mark.parametrize(
    ("offered", "want", "chosen"),
    [
        (["linux/amd64", "linux/arm64"], "linux/arm64", 1),
        (["linux/arm64/v8", "linux/amd64"], "linux/arm64", 0),
        (["linux/arm/v6", "linux/arm/v7", "linux/arm64"], "linux/arm/v7", 1),
        (["linux/arm/v5", "linux/arm/v6"], "linux/arm/v7", 1),  # closest compatible first
        (["linux/amd64/v3", "linux/amd64"], "linux/amd64", 1),  # exact beats ignored variant
        (["linux/amd64/v3", "linux/amd64/v2"], "linux/amd64", 0),  # then index order
        (["linux/amd64", "linux/amd64"], "linux/amd64", 0),
        (["unknown/unknown", "linux/amd64"], "linux/amd64", 1),
        ([None, "linux/amd64"], "linux/amd64", 1),  # a platform-less entry is a last resort
        ([None], "linux/arm64", 0),
    ],
)
def test_select_picks_the_best_manifest(offered, want, chosen):
    index = _index(*offered)
    assert platforms.select(index, platforms.parse(want)) is index.manifests[chosen]


def test_no_matching_platform_lists_what_the_index_offers():
    index = _index("linux/amd64", "linux/arm/v7", "unknown/unknown", "linux/amd64")
    with pytest.raises(errors.NoMatchingPlatform) as err:
        platforms.select(index, platforms.parse("linux/s390x"), what="docker.io/library/x:1")
    message = str(err.value)
    assert "linux/s390x" in message
    assert "docker.io/library/x:1" in message
    assert "linux/amd64, linux/arm/v7 " in message
    assert "unknown" not in message
    assert isinstance(err.value, errors.NotFound)


def test_an_index_without_platforms_says_so():
    with pytest.raises(errors.NoMatchingPlatform, match="offers no platforms"):
        platforms.select(_index(), platforms.parse("linux/amd64"))


def test_a_platformless_entry_that_is_not_an_image_manifest_never_matches():
    desc = descriptors.Descriptor(
        media_type="application/vnd.example+json",
        digest=digests.Digest("sha256:" + "e" * 64),
        size=1,
    )
    index = descriptors.Index(media_type=mediatypes.OCI_INDEX, manifests=(desc,))
    with pytest.raises(errors.NoMatchingPlatform):
        platforms.select(index, platforms.parse("linux/amd64"))
