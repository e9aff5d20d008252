"""Fetching ``http(s)`` URLs under a :class:`UrlPolicy`: which hosts may be contacted, and how long to wait.

Every hop (the first URL and each redirect) is checked the same way: scheme, host against the allowed
domains, then every address the host name resolves to against the policy. The connection is then made to
that vetted address (the Host header and TLS name stay the host name), so a DNS answer that changes
between the check and the connection (DNS rebinding) cannot redirect the request to a private address.
Redirects are followed here, not by urllib, so each one is checked before anything is sent to it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from owlvid.errors import MediaError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "LIBRARY_URL_POLICY",
    "MediaFetchError",
    "MediaForbiddenUrlError",
    "MediaTimeoutError",
    "MediaTooLargeError",
    "UrlPolicy",
    "check_limit",
    "copy_limited",
    "describe_url",
    "fetch_url",
]

DEFAULT_CONNECT_TIMEOUT = 10.0
# Kept in memory up to this size, then in a temp file, so a 1 GB video download does not sit in RAM.
_SPOOL_MEMORY_LIMIT = 32 * 1024 * 1024
_CHUNK = 1024 * 1024
_USER_AGENT = "owlvid-media/0.1"
_REDIRECTS = (301, 302, 303, 307, 308)
# Cloud instance metadata services (AWS/GCP/Azure/OpenStack, AWS IPv6, Alibaba): credentials live there,
# so they are refused even where private hosts are allowed.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)


class MediaTooLargeError(MediaError):
    """The input is larger than the configured limit (bytes or pixels)."""


class MediaFetchError(MediaError):
    """A URL could not be fetched (HTTP error, DNS failure, refused connection, ...)."""


class MediaTimeoutError(MediaFetchError):
    """Fetching a URL took longer than the ``timeout`` (or connecting longer than ``connect_timeout``)."""


class MediaForbiddenUrlError(MediaFetchError):
    """The URL (or a redirect) points to a host the :class:`UrlPolicy` does not allow."""


@dataclass(frozen=True)
class UrlPolicy:
    """Which hosts an ``http(s)`` media URL may reach, and how long to wait for them.

    The defaults are for untrusted input (a server): only public addresses. ``allowed_domains``: if set,
    only these host names (exact, case-insensitive) may be fetched, on every redirect hop too.
    ``allow_private_hosts``: also allow loopback, private (RFC 1918, ULA), link-local, CGNAT and other
    non-global addresses; cloud metadata addresses (169.254.169.254, ...) stay refused.
    ``connect_timeout``: seconds to connect and to receive the response headers, per hop (the total
    ``timeout`` of the download still applies). ``max_redirects``: redirects followed at most.
    """

    allow_private_hosts: bool = False
    allowed_domains: tuple[str, ...] | None = None
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if self.allowed_domains is not None:
            domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains if d.strip())
            object.__setattr__(self, "allowed_domains", domains)

    def check_host(self, host: str, desc: str) -> None:
        """Refuse a host name outside ``allowed_domains`` (before any DNS lookup)."""
        if self.allowed_domains is not None and host.lower().rstrip(".") not in self.allowed_domains:
            raise MediaForbiddenUrlError(f"{desc}: host {host!r} is not in the allowed media domains")

    def check_address(self, address: str, host: str, desc: str) -> None:
        """Refuse an IP address the policy does not allow (``host`` only names it in the message)."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        shown = host if host == str(ip) else f"{host} ({ip})"
        if ip in _METADATA_ADDRESSES:
            raise MediaForbiddenUrlError(f"{desc}: {shown} is a cloud metadata address; media URLs may not "
                                         "point there")
        if self.allow_private_hosts or (ip.is_global and not ip.is_multicast):
            return
        kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local
                else "unspecified" if ip.is_unspecified
                else "private" if ip.is_private else "non-public")
        raise MediaForbiddenUrlError(f"{desc}: {shown} is a {kind} address; media URLs must point to public "
                                     "hosts (private hosts need an explicit opt-in)")


# The library's own default (``owlvid.load(...)``, ``load_image``): the caller is the user's own program, so
# private hosts are allowed, like vLLM's offline API; the server passes a strict policy.
LIBRARY_URL_POLICY = UrlPolicy(allow_private_hosts=True)


def shorten(text: str, limit: int = 96) -> str:
    """Keep both ends: the end of a path (file name) is usually the informative part."""
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return text[:keep] + "..." + text[-keep:]


def describe_url(url: str) -> str:
    """Never echo credentials or query strings (signed URLs carry tokens) into messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        tail = "?..." if parts.query else ""
        return shorten(f"{parts.scheme}://{host}{parts.path}") + tail
    except ValueError:
        return shorten(url.split("?", 1)[0])


def check_limit(desc: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise MediaTooLargeError(f"{desc}: {size} bytes is more than the limit max_bytes={max_bytes}")


def copy_limited(read: Callable[[int], bytes], desc: str, max_bytes: int | None, deadline: float | None = None,
                 timeout: float | None = None) -> tempfile.SpooledTemporaryFile:
    """Copy ``read`` into a spooled temp file under the byte limit and the deadline; rewound."""
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_LIMIT)
    total = 0
    try:
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            check_limit(desc, total, max_bytes)
            out.write(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise MediaTimeoutError(f"{desc}: download did not finish within timeout={timeout} s")
    except BaseException:
        out.close()
        raise
    if total == 0:
        out.close()
        raise MediaError(f"{desc}: empty input (0 bytes)")
    out.seek(0)
    return out


def _vetted_addresses(host: str, port: int, policy: UrlPolicy, desc: str) -> list[tuple]:
    """Resolve ``host`` and check every address (a mixed answer is refused as a whole)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise MediaFetchError(f"{desc}: cannot resolve host {host!r} ({getattr(e, 'strerror', None) or e})") \
            from None
    if not infos:
        raise MediaFetchError(f"{desc}: cannot resolve host {host!r}")
    for *_, sockaddr in infos:
        policy.check_address(sockaddr[0], host, desc)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted addresses (in resolver order), not to whatever ``host`` resolves to now."""

    def __init__(self, host: str, port: int, addresses: list[tuple], connect_timeout: float | None) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self._addresses = addresses
        self.pinned: socket.socket | None = None  # kept: http.client drops `sock` once the response owns it

    def _raw_socket(self) -> socket.socket:
        error: OSError | None = None
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                return sock
            except TimeoutError:
                sock.close()
                raise
            except OSError as e:  # e.g. IPv6 unreachable: try the next address
                sock.close()
                error = e
        assert error is not None
        raise error

    def connect(self) -> None:
        self.sock = self.pinned = self._raw_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, port: int, addresses: list[tuple], connect_timeout: float | None) -> None:
        super().__init__(host, port, addresses, connect_timeout)
        self._context = ssl.create_default_context()

    def connect(self) -> None:
        self.sock = self.pinned = self._context.wrap_socket(self._raw_socket(), server_hostname=self.host)


def _connect_and_ask(url: str, policy: UrlPolicy, desc: str, wait: float | None, timeout_label: str):
    """One hop: check, connect to the vetted address, send GET, read the status and headers."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaFetchError(f"{desc}: redirect to unsupported scheme '{scheme}'")
    host = parts.hostname
    if not host:
        raise MediaFetchError(f"{desc}: URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise MediaFetchError(f"{desc}: invalid port in URL") from None
    policy.check_host(host, desc)
    addresses = _vetted_addresses(host, port, policy, desc)
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, addresses, wait)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity",
                                              "Connection": "close"})
        return conn, conn.getresponse()
    except TimeoutError:
        conn.close()
        raise MediaTimeoutError(f"{desc}: no answer within {timeout_label}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        conn.close()
        raise MediaFetchError(f"{desc}: cannot fetch ({getattr(e, 'strerror', None) or e})") from None


def fetch_url(url: str, desc: str, *, policy: UrlPolicy, max_bytes: int | None,
              timeout: float | None) -> tempfile.SpooledTemporaryFile:
    """Download ``url`` into a rewound spooled file under ``policy``, ``max_bytes`` and the ``timeout``
    deadline (seconds for the whole download, redirects included)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in range(policy.max_redirects + 1):
        # Each hop waits for connection + headers at most connect_timeout, and never past the deadline.
        wait, label = policy.connect_timeout, f"connect_timeout={policy.connect_timeout} s"
        if deadline is not None:
            remaining = max(deadline - time.monotonic(), 0.001)
            if wait is None or remaining <= wait:
                wait, label = remaining, f"timeout={timeout} s"
        conn, resp = _connect_and_ask(url, policy, desc, wait, label)
        try:
            location = resp.getheader("Location")
            if resp.status in _REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise MediaFetchError(f"{desc}: HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit():
                check_limit(desc, int(length), max_bytes)
            return copy_limited(_body_reader(conn, resp, desc, deadline, timeout), desc, max_bytes,
                                deadline=deadline, timeout=timeout)
        finally:
            resp.close()
            conn.close()
    raise MediaFetchError(f"{desc}: more than {policy.max_redirects} redirects")


def _body_reader(conn, resp, desc: str, deadline: float | None, timeout: float | None):
    def read(n: int) -> bytes:
        if deadline is not None and conn.pinned is not None:
            # a stalled read must not run past the deadline either
            conn.pinned.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            # read1: whatever arrives (one recv), so the deadline is checked while data trickles in;
            # read(n) would loop until n bytes and could run far past the deadline.
            return resp.read1(n)
        except TimeoutError:
            if deadline is None:
                raise MediaTimeoutError(f"{desc}: download stalled for more than connect_timeout") from None
            raise MediaTimeoutError(f"{desc}: download did not finish within timeout={timeout} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise MediaFetchError(f"{desc}: download failed ({e})") from None

    return read
