"""Which hosts an http(s) media URL may reach (UrlPolicy): addresses checked after DNS and on every
redirect, allowed domains, and the connect timeout. The local test server is on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from owlvid.errors import MediaError
from owlvid.media import (
    LIBRARY_URL_POLICY,
    MediaFetchError,
    MediaForbiddenUrlError,
    MediaTimeoutError,
    UrlPolicy,
    load_image,
    load_video,
    probe_video,
)

from .synth import read_index

STRICT = UrlPolicy()
PRIVATE_OK = UrlPolicy(allow_private_hosts=True)


@pytest.mark.parametrize(("url", "kind"), [
    ("http://127.0.0.1:{port}/frame.png", "loopback"),
    ("http://localhost:{port}/frame.png", "loopback"),
    ("http://[::1]:{port}/frame.png", "loopback"),
    ("http://10.1.2.3/x.png", "private"),
    ("http://192.168.0.10/x.png", "private"),
    ("http://172.16.5.4/x.png", "private"),
    ("http://169.254.10.10/x.png", "link-local"),
    ("http://[fe80::1]/x.png", "link-local"),
    ("http://0.0.0.0:{port}/x.png", "unspecified"),
    ("http://100.64.1.1/x.png", "non-public"),  # carrier-grade NAT
    ("http://[::ffff:127.0.0.1]:{port}/x.png", "loopback"),
    ("http://2130706433:{port}/x.png", "loopback"),  # 127.0.0.1 as one number: resolved, then checked
])
def test_non_public_addresses_refused_by_default(http_server, url, kind):
    port = http_server.rsplit(":", 1)[1]
    t0 = time.monotonic()
    with pytest.raises(MediaForbiddenUrlError, match=f"is a {kind} address; media URLs must point to public"):
        load_image(url.format(port=port), url_policy=STRICT)
    assert time.monotonic() - t0 < 2  # refused before any connection attempt


def test_metadata_address_refused_even_with_private_hosts_allowed():
    for policy in (STRICT, PRIVATE_OK, LIBRARY_URL_POLICY):
        with pytest.raises(MediaForbiddenUrlError, match="169.254.169.254 is a cloud metadata address"):
            load_image("http://169.254.169.254/latest/meta-data/iam", url_policy=policy)


def test_opt_in_private_hosts_and_library_default(http_server):
    assert read_index(load_image(f"{http_server}/frame.png", url_policy=PRIVATE_OK)) == 7
    assert read_index(load_image(f"{http_server}/frame.png")) == 7  # the library default: the caller's program
    assert probe_video(f"{http_server}/video.mp4", url_policy=PRIVATE_OK)["total_frames"] == 120
    with pytest.raises(MediaForbiddenUrlError):
        probe_video(f"{http_server}/video.mp4", url_policy=STRICT)
    with pytest.raises(MediaError, match="frame 0: .* is a loopback address"):  # frame lists of URLs too
        load_video([f"{http_server}/frame.png"] * 2, url_policy=STRICT)


def test_allowed_domains_enforced_on_every_hop(http_server):
    port = http_server.rsplit(":", 1)[1]
    only_ip = UrlPolicy(allow_private_hosts=True, allowed_domains=("127.0.0.1",))
    assert read_index(load_image(f"{http_server}/frame.png", url_policy=only_ip)) == 7
    with pytest.raises(MediaForbiddenUrlError, match="host 'localhost' is not in the allowed media domains"):
        load_image(f"http://localhost:{port}/frame.png", url_policy=only_ip)
    # an allowed host redirecting to a host outside the list: refused at the redirect
    with pytest.raises(MediaForbiddenUrlError, match="'localhost' is not in the allowed"):
        load_image(f"{http_server}/redirect-to/localhost/frame.png", url_policy=only_ip)
    ok = UrlPolicy(allow_private_hosts=True, allowed_domains=("LOCALHOST", "127.0.0.1"))  # case-insensitive
    assert read_index(load_image(f"{http_server}/redirect-to/localhost/frame.png", url_policy=ok)) == 7


class _IpLiteralIsPublic(UrlPolicy):
    """Stands in for a public host (none is reachable in the tests): the literal 127.0.0.1 passes, every
    other name is checked as usual, so 'localhost' is loopback."""

    def check_address(self, address: str, host: str, desc: str) -> None:
        if host != "127.0.0.1":
            super().check_address(address, host, desc)


def test_redirect_from_allowed_host_to_loopback_refused(http_server):
    policy = _IpLiteralIsPublic()
    assert read_index(load_image(f"{http_server}/frame.png", url_policy=policy)) == 7
    with pytest.raises(MediaForbiddenUrlError, match=r"localhost \(.*\) is a loopback address"):
        load_image(f"{http_server}/redirect-to/localhost/frame.png", url_policy=policy)


def test_redirect_limits(http_server):
    with pytest.raises(MediaFetchError, match="more than 3 redirects"):
        load_image(f"{http_server}/redirect-loop", url_policy=UrlPolicy(allow_private_hosts=True, max_redirects=3))
    with pytest.raises(MediaFetchError, match="redirect to unsupported scheme 'ftp'"):
        load_image(f"{http_server}/redirect-ftp", url_policy=PRIVATE_OK)


def test_silent_host_fails_within_connect_timeout(silent_host):
    policy = UrlPolicy(allow_private_hosts=True, connect_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(MediaTimeoutError, match=r"no answer within connect_timeout=0.5 s"):
        load_video(f"{silent_host}/v.mp4", url_policy=policy, timeout=60)
    assert time.monotonic() - t0 < 3
    # the total timeout still wins when it is the shorter one
    t0 = time.monotonic()
    with pytest.raises(MediaTimeoutError, match=r"timeout=0.3 s"):
        load_image(f"{silent_host}/x.png", url_policy=UrlPolicy(allow_private_hosts=True), timeout=0.3)
    assert time.monotonic() - t0 < 3


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """HTTPS on 127.0.0.1 with a self-signed certificate for 'localhost' (made with the openssl tool)."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    from .synth import index_frame, png_bytes

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    body = png_bytes(index_frame(11))

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Host-Seen", self.headers.get("Host", ""))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://localhost:{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()


def test_https_verifies_the_host_name_on_the_pinned_connection(https_server, monkeypatch):
    url, cert = https_server
    with pytest.raises(MediaFetchError, match="certificate verify failed"):  # not trusted by default
        load_image(f"{url}/frame.png", url_policy=PRIVATE_OK)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now trusted: the certificate names 'localhost'
    assert read_index(load_image(f"{url}/frame.png", url_policy=PRIVATE_OK)) == 11
    with pytest.raises(MediaForbiddenUrlError, match="loopback"):
        load_image(f"{url}/frame.png", url_policy=STRICT)
    # by IP the certificate (DNS:localhost only) does not match: the TLS name is the URL's host
    port = url.rsplit(":", 1)[1]
    with pytest.raises(MediaFetchError, match="certificate verify failed|match"):
        load_image(f"https://127.0.0.1:{port}/frame.png", url_policy=PRIVATE_OK)
