"""Which web pages and which host names may use the server: the `Origin` and `Host` checks.

Without them any web page the user visits could drive a local server: a cross-origin `no-cors` POST needs no
CORS approval to store an upload or start a URL fetch, and a DNS-rebinding page (its own domain re-pointed at
127.0.0.1) reads answers as if same-origin. As local model servers do (Ollama's OLLAMA_ORIGINS, Jupyter's
origin and host checks), a request is refused with 403:

- when its `Host` is not a name of this server: the address it listens on (`ServerConfig.bind_host`) and,
  bound to loopback, `localhost` / `127.0.0.1` / `[::1]`; bound to every interface (0.0.0.0, ::), any IP
  address, `localhost` and the machine's own host names (clients reach it by names we cannot know; a
  rebinding attack needs a domain name); plus `allowed_hosts` (`*`: any). Ports are not compared.
- when it carries an `Origin` (browsers send it on every cross-origin request and every POST) other than
  the server's own (same host and port as `Host`), unless listed in `allowed_origins` (`*`: any page).
  Listed origins also get CORS answers (preflight, `Access-Control-Allow-Origin`) so their pages can read
  responses. Requests without `Origin` (the `openai` client, curl) are not affected.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from . import schemas

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_host(authority: str) -> tuple[str, int | None]:
    """(lower-case name without brackets or final dot, port or None) of a `Host` value: `[::1]:8000`."""
    authority = authority.strip().lower()
    port: str | None = None
    if authority.startswith("["):
        name, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif authority.count(":") == 1:
        name, port = authority.split(":")
    else:
        name = authority  # a bare IPv6 address (not a valid Host, but harmless) or a name
    try:
        number = int(port) if port else None
    except ValueError:
        number = -1  # never equal to a real port
    return name.rstrip("."), number


def server_names(bind_host: str | None) -> tuple[set[str], bool]:
    """(host names the server answers to by default, whether any IP address is accepted too)."""
    bind = (bind_host if bind_host is not None else "127.0.0.1").strip().strip("[]").lower()
    if bind in WILDCARD_ADDRESSES:
        names = {"localhost", *LOOPBACK_NAMES}
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower().rstrip("."))
        return names, True
    names = {bind}
    loopback = bind == "localhost" or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback)
    if loopback:
        names.update(LOOPBACK_NAMES)
    return names, False


class OriginHostPolicy:
    """The decisions, apart from ASGI (see the module's docstring)."""

    def __init__(self, bind_host: str | None, allowed_hosts: list[str] | None = None,
                 allowed_origins: list[str] | None = None) -> None:
        self.names, self.any_ip = server_names(bind_host)
        extra_hosts = {split_host(h)[0] for h in allowed_hosts or []}
        self.any_host = "*" in extra_hosts
        self.names |= extra_hosts - {"*"}
        self.origins = {normalize_origin(o) for o in allowed_origins or []}
        self.any_origin = "*" in self.origins

    def host_allowed(self, host: str | None) -> bool:
        if host is None or self.any_host:  # no Host at all (HTTP/1.0): not a browser, no rebinding
            return True
        name, _ = split_host(host)
        return name in self.names or (self.any_ip and _is_ip(name))

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any_origin or normalize_origin(origin) in self.origins:
            return True
        return host is not None and same_authority(origin, host)


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]`, lower-case, without the scheme's default port; `*` and `null` as they are."""
    origin = origin.strip().lower().rstrip("/")
    if origin in ("*", "null"):
        return origin
    parts = urlsplit(origin)
    name, port = split_host(parts.netloc)
    if port == _DEFAULT_PORTS.get(parts.scheme):
        port = None
    shown = f"[{name}]" if ":" in name else name
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


def same_authority(origin: str, host: str) -> bool:
    """Whether a page's origin is this server as the request reached it (same name and port as `Host`). The
    scheme is not compared: behind a TLS proxy the page is https:// while the server sees http."""
    parts = urlsplit(origin.strip().lower())
    o_name, o_port = split_host(parts.netloc)
    h_name, h_port = split_host(host)
    o_port = None if o_port == _DEFAULT_PORTS.get(parts.scheme) else o_port
    h_port = None if h_port in (80, 443) else h_port
    return bool(o_name) and o_name == h_name and o_port == h_port


class OriginHostMiddleware:
    """Pure ASGI, outermost: refuses a foreign `Host` or `Origin` with 403 before anything else runs (no
    body is read, no upload stored)."""

    def __init__(self, app: Any, policy: OriginHostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get(b"host"), headers.get(b"origin")
        if not self.policy.host_allowed(host):
            shown = split_host(host or "")[0][:100]
            await _refuse(send, f"the Host {shown!r} is not a name of this server (DNS rebinding protection; "
                          f"start it with --allowed-hosts {shown} to allow it)", "host_not_allowed")
            return
        if not self.policy.origin_allowed(origin, host):
            shown = (origin or "")[:200]
            await _refuse(send, f"requests from the web page origin {shown!r} are refused (start the server "
                          f"with --allowed-origins {shown} to allow that page)", "origin_not_allowed")
            return
        await self.app(scope, receive, send)


async def _refuse(send: Any, message: str, code: str) -> None:
    raw = json.dumps(schemas.error_body(message, "invalid_request_error", code=code)).encode()
    # the body (an upload) is never read: the connection is closed after the answer
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})
