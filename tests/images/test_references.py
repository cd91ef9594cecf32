"""References parse and normalise as ``docker pull`` does."""

from __future__ import annotations

import pytest

from agent.images import digests, errors, references

D = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("user/app", "docker.io", "user/app", "", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "", None),
        ("docker.io/library/alpine", "docker.io", "library/alpine", "", None),
        ("index.docker.io/alpine", "docker.io", "library/alpine", "", None),
        ("index.docker.io/user/app:1", "docker.io", "user/app", "1", None),
        ("localhost/foo", "localhost", "foo", "", None),
        ("localhost:5000/foo", "localhost:5000", "foo", "", None),
        ("localhost:5000/foo:1.0", "localhost:5000", "foo", "1.0", None),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
        ("foo:5000/bar", "foo:5000", "bar", "", None),
        ("foo.com/bar", "foo.com", "bar", "", None),
        ("127.0.0.1:5000/team/app:1.4", "127.0.0.1:5000", "team/app", "1.4", None),
        ("[::1]:5000/x", "[::1]:5000", "x", "", None),
        ("[::1]/x:y", "[::1]", "x", "y", None),
        ("[fe80::1]:443/a/b", "[fe80::1]:443", "a/b", "", None),
        ("a/b/c/d:tag", "docker.io", "a/b/c/d", "tag", None),
        ("quay.io/a/b/c/d", "quay.io", "a/b/c/d", "", None),
        (f"alpine@{D}", "docker.io", "library/alpine", "", D),
        (f"alpine:3.20@{D}", "docker.io", "library/alpine", "3.20", D),
        (f"localhost:5000/foo@{D}", "localhost:5000", "foo", "", D),
        ("u/a-b__c.d_e/f--g:T_a.g-1", "docker.io", "u/a-b__c.d_e/f--g", "T_a.g-1", None),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "", None),
        ("x" * 30 + ".io/app", "x" * 30 + ".io", "app", "", None),
    ],
)
def test_valid_references_normalise_as_docker_does(text, domain, path, tag, digest):
    ref = references.parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must not be empty"),
        ("Foo/bar", "repository name must be lowercase"),
        ("docker.io/Alpine", "repository name must be lowercase"),
        ("ALPINE", "repository name must be lowercase"),
        ("alpine:", "invalid tag"),
        ("alpine:-x", "invalid tag"),
        ("alpine:.x", "invalid tag"),
        ("alpine:" + "t" * 129, "invalid tag"),
        ("alpine:a+b", "invalid tag"),
        ("alpine@sha256:abc", "invalid digest"),
        ("alpine@", "invalid digest"),
        (f"alpine@{D}@{D2}", "invalid digest"),
        ("alpine@md5:" + "a" * 32, "invalid digest"),
        ("alpine:3.20 ", "whitespace"),
        (" alpine", "whitespace"),
        ("alpine/", "empty component"),
        ("/alpine", "empty component"),
        ("a//b", "empty component"),
        ("localhost:5000/", "empty component"),
        ("a_/b", "invalid repository name component"),
        ("-a/b", "invalid repository name component"),
        ("a/b:c/d", "invalid repository name component"),
        ("a/b___c", "invalid repository name component"),
        ("ex_ample.com/app", "invalid registry domain"),
        ("-bad.com/app", "invalid registry domain"),
        ("::1/app", "invalid registry domain"),
        ("[::1:5000/app", "invalid registry domain"),
        ("host:port/app", "invalid registry domain"),
        (":tag", "the repository name is empty"),
        ("a" * 64, "image ID"),
        ("registry.io/" + "a" * 250, "not be more than 255 characters"),
    ],
)
def test_invalid_references_are_rejected_naming_the_text_and_the_problem(text, problem):
    with pytest.raises(errors.InvalidReference) as err:
        references.parse(text)
    assert problem in str(err.value)
    if text:
        assert repr(text) in str(err.value)


def test_a_name_of_exactly_255_characters_is_accepted():
    text = "registry.io/" + "a" * (255 - len("registry.io/"))
    assert len(references.parse(text).name) == 255


def test_a_short_docker_hub_name_counts_its_normalised_length():
    # docker checks the length of the normalised name, "docker.io/library/..." included
    with pytest.raises(errors.InvalidReference):
        references.parse("a" * 250)


@pytest.mark.parametrize(
    ("text", "full", "familiar", "obj"),
    [
        ("alpine", "docker.io/library/alpine:latest", "alpine:latest", "latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20", "alpine:3.20", "3.20"),
        ("user/app", "docker.io/user/app:latest", "user/app:latest", "latest"),
        ("library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest", "latest"),
        ("localhost:5000/foo", "localhost:5000/foo:latest", "localhost:5000/foo:latest", "latest"),
        (f"alpine@{D}", f"docker.io/library/alpine@{D}", f"alpine@{D}", D),
        (f"alpine:3@{D}", f"docker.io/library/alpine:3@{D}", f"alpine:3@{D}", D),
        ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000/x:latest", "latest"),
    ],
)
def test_a_reference_prints_in_full_and_familiar_form(text, full, familiar, obj):
    ref = references.parse(text)
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert ref.object == obj


@pytest.mark.parametrize(
    "text",
    ["alpine", "user/app:1", f"quay.io/a/b:c@{D}", "[::1]:5000/x", "localhost/foo"],
)
def test_the_full_form_parses_back_to_the_same_reference(text):
    ref = references.parse(text)
    again = references.parse(str(ref))
    assert again.name == ref.name
    assert again.object == ref.object


def test_name_is_domain_and_path():
    assert references.parse("alpine:3").name == "docker.io/library/alpine"


def test_the_digest_is_a_digest_object():
    ref = references.parse(f"alpine@{D}")
    assert isinstance(ref.digest, digests.Digest)
    assert ref.digest.hex == "a" * 64


def test_with_digest_pins_a_tagged_reference_and_keeps_the_tag():
    ref = references.parse("alpine:3.20").with_digest(D)
    assert ref.digest == D
    assert ref.tag == "3.20"
    assert ref.object == D
    assert str(ref) == f"docker.io/library/alpine:3.20@{D}"


def test_with_digest_rejects_a_bad_digest():
    with pytest.raises(errors.InvalidReference, match="invalid digest"):
        references.parse("alpine").with_digest("sha256:xyz")


def test_with_tag_replaces_the_tag_and_drops_the_digest():
    ref = references.parse(f"alpine:3@{D}").with_tag("edge")
    assert (ref.tag, ref.digest) == ("edge", None)
    with pytest.raises(errors.InvalidReference, match="invalid tag"):
        ref.with_tag("-bad")


def test_references_are_hashable_values():
    assert references.parse("alpine") == references.parse("docker.io/library/alpine")
    assert len({references.parse("alpine"), references.parse("index.docker.io/alpine")}) == 1


def test_an_invalid_reference_is_an_image_error():
    assert issubclass(errors.InvalidReference, errors.ImageError)
