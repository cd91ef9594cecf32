"""Image references: ``[domain/]path[:tag][@digest]``, normalised as docker does.

The grammar is docker's (``distribution/reference``)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] component ( "/" component )*
    domain     := host [ ":" port ]          host: DNS labels, or "[" IPv6 "]"
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex          (sha256 or sha512, see :mod:`digests`)

Normalisation, as ``docker pull`` applies it:

- the first component is a domain only if it contains ``.`` or ``:``, or is ``localhost``;
  otherwise the domain is ``docker.io`` and the whole name is the path;
- ``index.docker.io`` is spelled ``docker.io``;
- a one-component path on ``docker.io`` gets ``library/`` in front (``alpine`` →
  ``docker.io/library/alpine``);
- with neither tag nor digest, the reference means the tag ``latest``.

Examples::

    alpine                        docker.io/library/alpine:latest
    user/app:1.4                  docker.io/user/app:1.4
    localhost:5000/team/app       localhost:5000/team/app:latest
    [::1]:5000/app@sha256:…       [::1]:5000/app@sha256:…
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.images import digests, errors

#: The registry docker means when a reference names none.
DEFAULT_DOMAIN = "docker.io"
#: The namespace docker puts one-component Docker Hub paths in.
OFFICIAL_NAMESPACE = "library"
#: The tag a reference means when it has neither tag nor digest.
DEFAULT_TAG = "latest"
#: The longest name (domain and path) docker accepts.
NAME_MAX_LENGTH = 255

_LEGACY_DEFAULT_DOMAIN = "index.docker.io"

_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$", re.ASCII
)
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$", re.ASCII)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", re.ASCII)
_HEX_ID = re.compile(r"^[a-f0-9]{64}$", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference.

    Attributes:
        domain: the registry, as the user named it after normalisation (``docker.io``,
            ``127.0.0.1:5000``, ``[::1]:5000``). Which host is contacted for it is
            :mod:`agent.images.registry.hosts`' business.
        path: the repository path inside the registry (``library/alpine``).
        tag: the tag, or ``""`` if the reference had none.
        digest: the digest, or ``None``.
    """

    domain: str
    path: str
    tag: str = ""
    digest: digests.Digest | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry's ``manifests/`` endpoint for: the digest if there is
        one (it pins the content), else the tag (``latest`` when neither was given)."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        return self.name + self._suffix()

    def familiar(self) -> str:
        """Docker's short form, as ``docker images`` prints it: ``alpine:latest``,
        ``user/app:1.4``; references to other registries keep their domain."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            prefix = OFFICIAL_NAMESPACE + "/"
            if name.startswith(prefix) and "/" not in name[len(prefix) :]:
                name = name[len(prefix) :]
        return name + self._suffix()

    def with_digest(self, digest: str) -> Reference:
        """This reference pinned to ``digest`` (the tag, if any, is kept for display)."""
        return Reference(self.domain, self.path, self.tag, _digest(str(self), digest))

    def with_tag(self, tag: str) -> Reference:
        """This repository at ``tag``, without a digest."""
        if not _TAG.match(tag):
            raise errors.InvalidReference(f"invalid tag {tag!r} for {self.name}: {_TAG_RULE}")
        return Reference(self.domain, self.path, tag, None)

    def _suffix(self) -> str:
        tag = self.tag or ("" if self.digest is not None else DEFAULT_TAG)
        text = f":{tag}" if tag else ""
        return f"{text}@{self.digest}" if self.digest is not None else text


_TAG_RULE = (
    "a tag is 1 to 128 characters of letters, digits, '_', '.' and '-', "
    "not starting with '.' or '-'"
)


def parse(text: str) -> Reference:
    """Parse and normalise a reference, as ``docker pull`` does.

    Raises:
        errors.InvalidReference: naming the text and what is wrong with it.
    """
    if not isinstance(text, str) or not text:
        raise errors.InvalidReference("invalid reference '': a reference must not be empty")
    if any(c.isspace() for c in text):
        raise errors.InvalidReference(f"invalid reference {text!r}: it must not contain whitespace")
    if _HEX_ID.match(text):
        raise errors.InvalidReference(
            f"invalid reference {text!r}: a 64-character hexadecimal string is an image ID, "
            "not a repository name"
        )

    rest, at, digest_text = text.partition("@")
    digest = _digest(text, digest_text) if at else None

    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise errors.InvalidReference(
                f"invalid reference {text!r}: invalid tag {tag!r}; {_TAG_RULE}"
            )

    if not rest:
        raise errors.InvalidReference(f"invalid reference {text!r}: the repository name is empty")
    domain, path = _split_domain(text, rest)
    for component in path.split("/"):
        _check_component(text, component)

    name = f"{domain}/{path}"
    if len(name) > NAME_MAX_LENGTH:
        raise errors.InvalidReference(
            f"invalid reference {text!r}: repository name must not be more than "
            f"{NAME_MAX_LENGTH} characters (it is {len(name)})"
        )
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def _split_domain(text: str, name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if slash and (("." in first or ":" in first) or first == "localhost"):
        if not _DOMAIN.match(first):
            raise errors.InvalidReference(
                f"invalid reference {text!r}: invalid registry domain {first!r} "
                "(expected host[:port], e.g. registry.example.com:5000 or [::1]:5000)"
            )
        domain, path = first, remainder
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == _LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    return domain, path


def _check_component(text: str, component: str) -> None:
    if _COMPONENT.match(component):
        return
    if not component:
        problem = "the repository path has an empty component (a leading, trailing or double '/')"
    elif component.lower() != component and _COMPONENT.match(component.lower()):
        problem = f"repository name must be lowercase ({component!r})"
    elif ":" in component:
        problem = f"invalid repository name component {component!r} (a ':' in the path)"
    else:
        problem = (
            f"invalid repository name component {component!r} (lowercase letters and digits, "
            "separated by '.', '_', '__' or '-')"
        )
    raise errors.InvalidReference(f"invalid reference {text!r}: {problem}")


def _digest(text: str, value: str) -> digests.Digest:
    try:
        return digests.Digest(value)
    except errors.InvalidReference as e:
        raise errors.InvalidReference(f"invalid reference {text!r}: {e}") from e
