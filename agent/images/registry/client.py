"""``RegistryClient``: the OCI distribution API over ``httpx.AsyncClient``.

Every request goes through one choke point (:meth:`RegistryClient._request`) that:

* tries the reference's hosts in order (mirrors from ``hosts.toml`` first, then the
  upstream), moving on when a host does not have the content or cannot be reached;
* for a loopback registry, falls back from HTTPS to plain HTTP, as Docker and containerd do;
* authorizes (Basic, or Bearer tokens per repository scope) and refreshes on ``401``;
* retries connection errors and ``5xx`` with exponential backoff, and ``429``/``503``
  after the registry's ``Retry-After``;
* follows redirects itself: a hop to another origin (blob storage, a CDN) carries none of
  the registry's ``Authorization``, ``Cookie`` or ``hosts.toml`` headers, and a ``401``
  from such a host is answered only with what is configured for *that* host, as
  containerd authorizes each redirect hop for its own host;
* turns ``httpx`` errors into the image service's error tree, keeping the original as cause.

HTTP timeouts bound *silence*, never a transfer: connecting and each socket read have a
limit, a whole body does not, so a large blob that keeps moving is never cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

import agent
from agent.images import descriptors, digests, errors, mediatypes, references
from agent.images.registry import auth, credentials, errcodes, hosts

#: Redirect hops followed before giving up.
MAX_REDIRECTS = 5
#: How much of an error body is read (error JSON is small; a lying registry may not be).
MAX_ERROR_BODY = 64 * 1024
#: The longest ``Retry-After`` that is honoured as given; longer ones are capped.
MAX_RETRY_AFTER = 60.0
#: What one socket read of a response asks for. httpcore asks for 64 KiB, and every read
#: costs ~0.1 ms of Python besides its bytes (h11's events, anyio's cancel scope for the
#: read timeout): on the 1 GiB benchmark image 0.85 s of CPU per pull, taken from the
#: threads applying the layers (bench/README.md, session 6). asyncio's socket transports
#: hand over at most 256 KiB per read; a slow link simply returns less.
READ_BYTES = 256 * 1024


def read_more_per_socket_read() -> None:
    """Make httpcore's HTTP/1.1 connections of this process read :data:`READ_BYTES` at a
    time (its ``READ_NUM_BYTES``, a class constant), unless they already read more."""
    connection = httpcore.AsyncHTTP11Connection
    if getattr(connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
        connection.READ_NUM_BYTES = READ_BYTES


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request: connection errors, 5xx, 429.

    ``backoff(n)`` is ``base * 2**(n-1)`` with ±20 % jitter, capped at ``cap`` seconds.
    """

    attempts: int = 5
    base: float = 0.5
    cap: float = 10.0

    def backoff(self, attempt: int) -> float:
        delay = min(self.cap, self.base * (2 ** max(attempt - 1, 0)))
        return delay * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Timeouts:
    """Silence limits in seconds (``None``: no limit). None of them bounds a whole body."""

    connect: float = 30.0
    #: one socket read of a manifest, token or error response
    read: float = 60.0
    write: float = 60.0


@dataclass
class BlobBody:
    """An open blob response. ``offset`` is where its bytes start (0 if ``Range`` was ignored)."""

    offset: int
    length: int | None
    _response: httpx.Response
    _read_timeout: float | None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's raw bytes as they arrive; ends at EOF, when the response is closed.

        Raises:
            RequestStalled: no byte arrived for the read timeout (the socket went silent).
            Unavailable: the connection broke mid-body.
        """
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.ReadTimeout as e:
            raise RequestStalled(
                f"no data for {self._read_timeout}s from {self._response.url.host}"
            ) from e
        except (httpx.TransportError, httpx.StreamError) as e:
            raise errors.Unavailable(
                f"the connection to {self._response.url.host} broke mid-download: {e!r}"
            ) from e
        finally:
            await self._response.aclose()


class RequestStalled(errors.Unavailable):
    """One request's body went silent for its read timeout. Resumable; not a pull stall."""

    reason = "RequestStalled"


@dataclass(frozen=True)
class PingResult:
    """What ``GET /v2/`` said: where the registry answered and which auth it wants."""

    url: str
    #: "" (anonymous), "basic" or "bearer"
    auth_scheme: str
    #: the ``Docker-Distribution-API-Version`` header, if any
    api_version: str


class RegistryClient:
    """Reads manifests and blobs from registries. One per process; close with :meth:`aclose`."""

    def __init__(
        self,
        registry_hosts: hosts.RegistryHosts,
        keychain: credentials.Keychain | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = f"image-prefetcher/{agent.__version__}",
        sleep: Callable[[float], Any] = asyncio.sleep,
    ):
        self._hosts = registry_hosts
        self._keychain = keychain or credentials.Keychain.empty()
        self._retry = retry or RetryPolicy()
        self._timeouts = timeouts or Timeouts()
        self._transport = transport
        self._user_agent = user_agent
        self._sleep = sleep
        self._clients: dict[tuple[Any, ...], httpx.AsyncClient] = {}
        self._plain: set[str] = set()  # loopback hosts found to speak plain HTTP
        self._auth = auth.Authorizer(self._keychain, self._send_token_request)
        read_more_per_socket_read()

    @property
    def keychain(self) -> credentials.Keychain:
        """The credentials this client authenticates with (a CRI runtime gets them too)."""
        return self._keychain

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # The API.

    async def ping(self, domain: str) -> PingResult:
        """``GET /v2/`` on the first host of ``domain`` that answers (no credentials sent).

        A 200 or 401 means a registry answered; a 401's challenge says which auth it wants.
        Loopback hosts fall back to plain HTTP as every other request does.

        Raises:
            Unavailable: no host answered (the message names the last one and why).
            RegistryError: a host answered something a registry would not.
        """
        last: errors.ImageError | None = None
        for host in self._hosts.for_domain(domain):
            tries = [host]
            if host.fallback_plain_http and host.scheme == "https":
                plain = dataclasses.replace(host, scheme="http", fallback_plain_http=False)
                tries = [plain] if host.host in self._plain else [host, plain]
            for attempt in tries:
                url = f"{attempt.scheme}://{attempt.host}{attempt.path}/"
                try:
                    response = await self._client(attempt).get(
                        url,
                        headers={"User-Agent": self._user_agent, **attempt.headers},
                        timeout=self._timeout("default"),
                    )
                except (httpx.HTTPError, ssl.SSLError) as e:
                    last = errors.Unavailable(f"{attempt.host} did not answer /v2/: {_describe(e)}")
                    continue
                if attempt is not host:
                    self._plain.add(host.host)
                if response.status_code not in (200, 401):
                    last = errcodes.error_for(
                        response.status_code, response.content, response.headers,
                        what=f"/v2/ at {attempt.host}",
                    )
                    continue
                challenges = auth.parse_challenges(response.headers.get("www-authenticate", ""))
                scheme = challenges[0].scheme if response.status_code == 401 and challenges else ""
                return PingResult(
                    url=url,
                    auth_scheme=scheme,
                    api_version=response.headers.get("docker-distribution-api-version", ""),
                )
        if last is None:
            raise errors.NotFound(f"no host is configured for {domain}")
        raise last

    async def resolve(self, ref: references.Reference) -> descriptors.Descriptor | None:
        """``HEAD`` the manifest: its descriptor, or ``None`` if the registry gave no digest.

        For a digest reference nothing is sent: the digest is the answer's identity.
        """
        if ref.digest is not None:
            return None
        response = await self._request(
            ref, "HEAD", "manifests", ref.object, headers={"Accept": mediatypes.MANIFEST_ACCEPT}
        )
        await response.aclose()
        header = response.headers.get("docker-content-digest", "")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        length = response.headers.get("content-length")
        if not digests.is_digest(header) or not length or not length.isdigit():
            return None
        return descriptors.Descriptor(
            media_type=media_type, digest=digests.Digest(header), size=int(length)
        )

    async def fetch_manifest(
        self, ref: references.Reference, object_: str | None = None
    ) -> tuple[descriptors.Descriptor, bytes]:
        """``GET`` a manifest or index by tag or digest; verify and size-cap it.

        A manifest fetched by digest must hash to that digest; one fetched by tag must hash
        to the ``Docker-Content-Digest`` the registry stated, if it stated one.
        """
        obj = object_ or ref.object
        what = f"manifest {ref.name}:{obj}" if not digests.is_digest(obj) else f"{ref.name}@{obj}"
        response = await self._request(
            ref, "GET", "manifests", obj, headers={"Accept": mediatypes.MANIFEST_ACCEPT}
        )
        try:
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > descriptors.MAX_MANIFEST_BYTES:
                raise errors.InvalidManifest(
                    f"{what} is {length} bytes, over the {descriptors.MAX_MANIFEST_BYTES}-byte"
                    " manifest limit"
                )
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > descriptors.MAX_MANIFEST_BYTES:
                    raise errors.InvalidManifest(
                        f"{what} exceeds the {descriptors.MAX_MANIFEST_BYTES}-byte manifest limit"
                    )
        except httpx.HTTPError as e:
            raise errors.Unavailable(f"reading {what} from {response.url.host} failed: {e}") from e
        finally:
            await response.aclose()
        data = bytes(body)
        expected = obj if digests.is_digest(obj) else response.headers.get("docker-content-digest")
        if not expected or not digests.is_digest(expected):
            expected = None
        # Hashed with the algorithm of the digest it must match (sha512 as well as sha256).
        actual = digests.of(data, digests.Digest(expected).algorithm if expected else "sha256")
        if expected and actual != expected:
            raise errors.DigestMismatch(
                f"{what}: the registry at {response.url.host} sent a manifest that hashes to"
                f" {actual}, not {expected}; refusing it"
            )
        media_type = descriptors.media_type_of(data, response.headers.get("content-type", ""))
        return descriptors.Descriptor(media_type=media_type, digest=actual, size=len(data)), data

    @contextlib.asynccontextmanager
    async def open_blob(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        *,
        offset: int = 0,
        read_timeout: float | None = None,
    ) -> AsyncIterator[BlobBody]:
        """Open a blob's body from ``offset`` (a ``Range`` request when > 0).

        ``read_timeout`` limits socket silence while reading the body (the per-request stall
        limit); ``None`` waits forever. The response is closed when the body hits EOF, not
        when this context exits, so a slow commit afterwards holds no connection.
        """
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = await self._request(
            ref, "GET", "blobs", str(desc.digest), headers=headers, read_timeout=read_timeout
        )
        try:
            start = 0  # a 200 answers from the first byte, whatever Range asked
            if response.status_code == 206:
                given = _content_range_start(response.headers.get("content-range", ""))
                if given != offset:
                    raise errors.Unavailable(
                        f"{response.url.host} answered a Range request for {desc.digest} from"
                        f" byte {offset} with Content-Range"
                        f" {response.headers.get('content-range')!r}"
                    )
                start = offset
            length_header = response.headers.get("content-length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            body = BlobBody(start, length, response, read_timeout)
            yield body
        finally:
            await response.aclose()

    # The choke point.

    async def _request(
        self,
        ref: references.Reference,
        method: str,
        kind: str,
        obj: str,
        *,
        headers: Mapping[str, str],
        read_timeout: float | None | str = "default",
    ) -> httpx.Response:
        """Send a request for ``/v2/<name>/<kind>/<obj>`` to the first host that has it.

        Returns a response with a 2xx status whose body has not been read yet.
        """
        capability = "resolve" if kind == "manifests" and not digests.is_digest(obj) else "pull"
        candidates = [h for h in self._hosts.for_domain(ref.domain) if capability in h.capabilities]
        if not candidates:
            raise errors.NotFound(f"no host configured for {ref.domain} can {capability} content")
        what = f"{kind[:-1]} {ref.name}{'@' if digests.is_digest(obj) else ':'}{obj}"
        last: errors.ImageError | None = None
        for i, host in enumerate(candidates):
            is_last = i == len(candidates) - 1
            try:
                return await self._request_host(
                    host, ref, method, kind, obj, headers, read_timeout, what
                )
            except (errors.NotFound, errors.Unavailable, errors.Denied) as e:
                if is_last:
                    raise
                last = e  # a mirror without the content, or down: try the next host
            except errors.Unauthorized as e:
                if is_last:
                    raise
                last = e
        assert last is not None  # pragma: no cover
        raise last  # pragma: no cover

    async def _request_host(
        self,
        host: hosts.RegistryHost,
        ref: references.Reference,
        method: str,
        kind: str,
        obj: str,
        headers: Mapping[str, str],
        read_timeout: float | None | str,
        what: str,
    ) -> httpx.Response:
        if host.fallback_plain_http and host.host in self._plain:
            host = dataclasses.replace(host, scheme="http", fallback_plain_http=False)
        url = host.url(ref.path, kind, obj)
        scope = f"repository:{ref.path}:pull"
        attempt = 0
        authorized: set[str] = set()  # hosts whose 401 was answered once already
        while True:
            attempt += 1
            # identity: digests are over the bytes as stored; a compressed transfer encoding
            # (httpx asks for gzip/zstd by default) would be hashed compressed.
            request_headers = {
                "User-Agent": self._user_agent,
                "Accept-Encoding": "identity",
                **host.headers,
                **headers,
            }
            authorization = self._auth.header(host.host, scope)
            if authorization:
                request_headers["Authorization"] = authorization
            try:
                response = await self._send_following(
                    host, method, url, request_headers, read_timeout, scope
                )
            except (httpx.ConnectError, ssl.SSLError) as e:
                if host.fallback_plain_http and host.scheme == "https":
                    self._plain.add(host.host)
                    host = dataclasses.replace(host, scheme="http", fallback_plain_http=False)
                    url = host.url(ref.path, kind, obj)
                    attempt -= 1
                    continue
                if attempt < self._retry.attempts:
                    await self._sleep(self._retry.backoff(attempt))
                    continue
                raise errors.Unavailable(
                    f"cannot connect to {host.host} for {what}: {_describe(e)}; check that the"
                    " registry is up and reachable from this node (address, DNS, firewall, TLS)"
                ) from e
            except httpx.TransportError as e:
                if attempt < self._retry.attempts:
                    await self._sleep(self._retry.backoff(attempt))
                    continue
                raise errors.Unavailable(
                    f"request for {what} to {host.host} failed {attempt} times: {_describe(e)}"
                ) from e

            status = response.status_code
            if 200 <= status < 300:
                return response
            body = await _read_capped(response)
            # The host that answered: the registry, or a redirect target with its own auth.
            answering = (
                host.host if _same_origin(response.url, httpx.URL(url))
                else _authority(response.url)
            )
            if status == 401 and answering not in authorized:
                authorized.add(answering)
                await self._auth.authorize(answering, scope, response)
                attempt -= 1
                continue
            error = errcodes.error_for(
                status, body, response.headers, what=f"{what} at {answering}"
            )
            retryable = status == 429 or status >= 500
            if retryable and attempt < self._retry.attempts:
                delay = self._retry.backoff(attempt)
                retry_after = getattr(error, "retry_after", None)
                if retry_after is None:
                    retry_after = errcodes.parse_retry_after(response.headers.get("retry-after"))
                if retry_after is not None:
                    delay = min(max(retry_after, 0.0), MAX_RETRY_AFTER)
                await self._sleep(delay)
                continue
            raise error

    async def _send_following(
        self,
        host: hosts.RegistryHost,
        method: str,
        url: str,
        headers: dict[str, str],
        read_timeout: float | None | str,
        scope: str,
    ) -> httpx.Response:
        """Send, following redirects by hand.

        A hop to another origin (scheme, host or port) gets the request without
        ``Authorization``, ``Cookie`` and the headers configured for the registry host
        (compared case-insensitively), plus the authorization known for the target host
        itself, if any (a token it asked for on an earlier ``401``).
        """
        client = self._client(host)
        timeout = self._timeout(read_timeout)
        origin = httpx.URL(url)
        current = origin
        private = {"authorization", "cookie", *(name.lower() for name in host.headers)}
        hop_headers = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            request = client.build_request(method, current, headers=hop_headers, timeout=timeout)
            response = await client.send(request, stream=True)
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("location")
            await response.aclose()
            if not location:
                raise errors.RegistryError(
                    f"{current.host} answered {response.status_code} without a Location header",
                    status=response.status_code,
                )
            target = current.join(location)
            if not _same_origin(target, origin):
                hop_headers = {k: v for k, v in headers.items() if k.lower() not in private}
                hop_headers.setdefault("User-Agent", self._user_agent)
                authorization = self._auth.header(_authority(target), scope)
                if authorization:
                    hop_headers["Authorization"] = authorization
                client = self._client(None)
            else:
                hop_headers, client = dict(headers), self._client(host)
            if response.status_code == 303:
                method = "GET"
            current = target
        raise errors.Unavailable(
            f"too many redirects from {origin.host} (more than {MAX_REDIRECTS})"
        )

    def _timeout(self, read_timeout: float | None | str) -> httpx.Timeout:
        read = self._timeouts.read if read_timeout == "default" else read_timeout
        assert not isinstance(read, str)
        return httpx.Timeout(
            connect=self._timeouts.connect, read=read, write=self._timeouts.write, pool=None
        )

    def _client(self, host: hosts.RegistryHost | None) -> httpx.AsyncClient:
        """One client per TLS configuration (a redirect target gets the default one)."""
        if host is None:
            key: tuple[Any, ...] = ("default",)
        else:
            key = (host.ca_files, host.client_certs, host.skip_verify)
        client = self._clients.get(key)
        if client is None:
            verify: Any = True
            cert: Any = None
            if host is not None:
                if host.skip_verify:
                    verify = False
                elif host.ca_files:
                    context = ssl.create_default_context()
                    for ca in host.ca_files:
                        context.load_verify_locations(cafile=ca)
                    verify = context
                if host.client_certs:
                    cert = host.client_certs[0]
            if cert is not None and isinstance(verify, ssl.SSLContext):
                verify.load_cert_chain(*cert)
            elif cert is not None:
                context = ssl.create_default_context()
                if verify is False:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                context.load_cert_chain(*cert)
                verify = context
            kwargs: dict[str, Any] = {"verify": verify, "follow_redirects": False}
            if self._transport is not None:
                kwargs["transport"] = self._transport
            client = httpx.AsyncClient(**kwargs)
            self._clients[key] = client
        return client

    async def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        client = self._client(None)
        request.headers.setdefault("User-Agent", self._user_agent)
        request.extensions["timeout"] = self._timeout("default").as_dict()
        response = await client.send(request)
        return response


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _authority(url: httpx.URL) -> str:
    """``host[:port]`` of ``url``, as hosts and credentials are keyed (``[::1]:5000``)."""
    return url.netloc.decode("ascii")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        unit, rest = value.split(" ", 1)
        if unit.strip() != "bytes":
            return None
        return int(rest.split("-", 1)[0])
    except (ValueError, IndexError):
        return None


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return bytes(body[:MAX_ERROR_BODY])


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
