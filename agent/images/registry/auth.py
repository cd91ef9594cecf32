"""Registry authorization: ``WWW-Authenticate`` challenges, Basic, and Bearer tokens.

The flow is the Docker/OCI token flow that containerd's ``docker.NewDockerAuthorizer``
follows: a request goes out with whatever authorization is cached for its host and scope;
a ``401`` carries a challenge; for ``Basic`` the keychain's username and password are
used; for ``Bearer`` a token is fetched from the challenge's ``realm`` for the request's
scope (``repository:<name>:pull``), with Basic credentials (or an identity token, as an
OAuth2 refresh token) when the keychain has some, anonymously otherwise. Tokens are cached
per host and scope until shortly before they expire; a ``401`` on a cached token drops it
and fetches a fresh one once.

``host`` is always the host that answered the ``401``, and its credentials are the only
ones used: blob storage behind a redirect never gets the registry's. Credentials are not
sent to a token realm on *another* host over plain HTTP (anyone on the path would read
them); a realm over TLS, or on the registry's own host name, is fine.

Credentials and tokens never appear in messages, logs or span attributes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from agent.images import errors
from agent.images.registry import credentials

#: Tokens are refreshed this long before the expiry the token server gave.
EXPIRY_MARGIN = 10.0
#: A token server that states no lifetime gets the spec's default.
DEFAULT_TOKEN_LIFETIME = 60.0

_PARAM = re.compile(r'\s*([A-Za-z0-9_\-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` header into challenges (RFC 7235, as registries send it)."""
    out: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        m = re.match(r"\s*([A-Za-z][A-Za-z0-9_\-]*)\s*", text[pos:])
        if not m:
            break
        scheme = m.group(1).lower()
        pos += m.end()
        params: dict[str, str] = {}
        while pos < len(text):
            pm = _PARAM.match(text, pos)
            if not pm or pm.end() == pos:
                break
            # A bare word followed by '=' is a parameter; a word then space is the next scheme.
            params[pm.group(1).lower()] = (
                pm.group(2).replace('\\"', '"') if pm.group(2) is not None else pm.group(3)
            )
            pos = pm.end()
        out.append(Challenge(scheme, params))
        while pos < len(text) and text[pos] in ", ":
            pos += 1
    return out


@dataclass
class _Token:
    value: str
    expires_at: float


#: Sends a token request: (method, url, params/form, basic-auth or None) → response.
TokenSender = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Authorizer:
    """Caches and obtains authorization for registry requests, per host and scope."""

    def __init__(
        self,
        keychain: credentials.Keychain,
        send: TokenSender,
        *,
        clock: Callable[[], float] = time.monotonic,
        client_id: str = "image-prefetcher",
    ):
        self._keychain = keychain
        self._send = send
        self._clock = clock
        self._client_id = client_id
        self._schemes: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}

    def header(self, host: str, scope: str) -> str | None:
        """The ``Authorization`` value to send to ``host`` for ``scope``, if one is known."""
        challenge = self._schemes.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            cred = self._keychain.lookup(host)
            return _basic(cred) if cred and cred.username else None
        token = self._tokens.get((host, scope))
        if token is None or token.expires_at <= self._clock():
            return None
        return f"Bearer {token.value}"

    async def authorize(self, host: str, scope: str, response: httpx.Response) -> str:
        """Answer a 401 from ``host``: return the ``Authorization`` value to retry with.

        Raises:
            Unauthorized: no usable challenge, no credentials for Basic, or the token server
                refused the credentials.
        """
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        self._tokens.pop((host, scope), None)
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                self._schemes[host] = challenge
                token = await self._fetch_token(host, scope, challenge)
                self._tokens[(host, scope)] = token
                return f"Bearer {token.value}"
        for challenge in challenges:
            if challenge.scheme == "basic":
                self._schemes[host] = challenge
                cred = self._keychain.lookup(host)
                if cred is None or not cred.username:
                    raise errors.Unauthorized(
                        f"{host} requires a username and password and none is configured for"
                        " it; add it to the auth file (--auth-file, REGISTRY_AUTH_FILE,"
                        " ~/.docker/config.json) or to the imagePullSecrets",
                        status=401,
                    )
                return _basic(cred)
        raise errors.Unauthorized(
            f"{host} answered 401 without a usable WWW-Authenticate challenge", status=401
        )

    async def _fetch_token(self, host: str, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        cred = self._keychain.lookup(host)
        if cred is not None and (cred.username or cred.identity_token):
            _refuse_cleartext_realm(host, realm)
        if cred is not None and cred.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "service": service,
                "scope": scope,
                "client_id": self._client_id,
            }
            request = httpx.Request("POST", realm, data=form)
        else:
            query = {"scope": scope}
            if service:
                query["service"] = service
            headers = {}
            if cred is not None and cred.username:
                headers["Authorization"] = _basic(cred)
            request = httpx.Request("GET", realm, params=query, headers=headers)
        who = f"as {cred.username!r}" if cred is not None and cred.username else "anonymously"
        try:
            response = await self._send(request)
        except httpx.HTTPError as e:
            raise errors.Unavailable(
                f"cannot reach the token server {request.url.host} for {host}: {e}"
            ) from e
        if response.status_code in (401, 403):
            raise errors.Unauthorized(
                f"the token server for {host} refused a token for {scope} {who}"
                f" ({response.status_code}); check the credentials for {host}",
                status=401,
            )
        if response.status_code != 200:
            raise errors.Unavailable(
                f"the token server for {host} answered {response.status_code} for {scope}"
            )
        try:
            body = response.json()
        except ValueError as e:
            raise errors.Unauthorized(
                f"the token server for {host} returned a body that is not JSON", status=401
            ) from e
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise errors.Unauthorized(
                f"the token server for {host} returned no token for {scope}", status=401
            )
        try:
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        return _Token(value, self._clock() + max(lifetime - EXPIRY_MARGIN, 1.0))


def _refuse_cleartext_realm(host: str, realm: str) -> None:
    """Raise unless credentials for ``host`` may go to ``realm``: over TLS, or on ``host``'s
    own host name (the registry itself is then reached the same way)."""
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL as e:
        raise errors.Unauthorized(
            f"{host} named the token realm {realm!r}, which is not a URL", status=401
        ) from e
    registry_name = httpx.URL(f"//{host}").host
    if url.scheme == "https" or url.host == registry_name:
        return
    raise errors.Unauthorized(
        f"{host} asks for credentials to be sent to the token realm {realm}, which is plain"
        f" HTTP on another host ({url.host}); refusing to send them in clear text. Serve the"
        " token realm over HTTPS (or on the registry's own host)",
        status=401,
    )


def _basic(cred: credentials.Credential) -> str:
    return httpx.BasicAuth(cred.username, cred.password)._auth_header
