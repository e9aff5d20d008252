"""Server hardening end to end (a real `owlvid serve` process): http(s) media may only reach public hosts
unless opted in (server-side request forgery), and error messages never reveal the server's file system."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from .helpers import ServerProcess, needs_media, png_bytes
from .test_openai_api import MODEL, assert_openai_error, post

# -- a local HTTP server that media URLs point to ------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    image = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.startswith("/redirect-to/"):  # /redirect-to/HOST/PATH on the same port
            host, _, rest = self.path[len("/redirect-to/"):].partition("/")
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{self.server.server_address[1]}/{rest}")
            self.end_headers()
            return
        if self.path != "/image.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)


@pytest.fixture(scope="module")
def media_host():
    _Handler.image = png_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def private_server(server_model_dir, tmp_path_factory):
    """Opted in to private hosts, but only the host name 127.0.0.1, with a 1 s connect timeout."""
    srv = ServerProcess(server_model_dir, tmp_path_factory.mktemp("security-logs"), "--allow-private-media-hosts",
                        "--allowed-media-domains", "127.0.0.1,media.invalid", "--media-connect-timeout", "1")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def image_body(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}


def video_body(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}]}


# -- server-side request forgery ---------------------------------------------------------------------


@pytest.mark.parametrize(("host", "fragment"), [
    ("127.0.0.1:{port}", "127.0.0.1 is a loopback address"),
    ("localhost:{port}", "is a loopback address"),
    ("[::1]:{port}", "::1 is a loopback address"),
    ("10.0.0.7", "10.0.0.7 is a private address"),
    ("192.168.1.1", "192.168.1.1 is a private address"),
    ("169.254.1.1", "169.254.1.1 is a link-local address"),
    ("169.254.169.254", "169.254.169.254 is a cloud metadata address"),
])
def test_private_media_hosts_refused_by_default(server, media_host, host, fragment):
    needs_media()
    url = f"http://{host.format(port=media_host.rsplit(':', 1)[1])}/image.png"
    for body in (image_body(url), video_body(url)):
        t0 = time.monotonic()
        err = assert_openai_error(post(server, body), 400)
        assert fragment in err["message"] and "media URLs" in err["message"]
        assert time.monotonic() - t0 < 10


def test_private_hosts_opt_in_and_allowed_domains(private_server, media_host):
    needs_media()
    ok = post(private_server, image_body(f"{media_host}/image.png"))
    assert ok.status_code == 200, ok.text
    port = media_host.rsplit(":", 1)[1]
    err = assert_openai_error(post(private_server, image_body(f"http://localhost:{port}/image.png")), 400)
    assert "'localhost' is not in the allowed media domains" in err["message"]
    # an allowed host that redirects elsewhere: every hop is checked
    err = assert_openai_error(post(private_server, image_body(f"{media_host}/redirect-to/localhost/image.png")),
                              400)
    assert "'localhost' is not in the allowed media domains" in err["message"]
    # the metadata address stays refused even with private hosts allowed (the name is allowed, its address not)
    err = assert_openai_error(post(private_server, image_body("http://169.254.169.254/latest/meta-data/")), 400)
    assert "not in the allowed media domains" in err["message"]


def test_silent_media_host_fails_within_connect_timeout(private_server, silent_host):
    needs_media()
    for body in (image_body(f"{silent_host}/image.png"), video_body(f"{silent_host}/v.mp4")):
        t0 = time.monotonic()
        err = assert_openai_error(post(private_server, body), 400)
        assert "no answer within connect_timeout=1.0 s" in err["message"]
        assert time.monotonic() - t0 < 8  # not the 60 s download timeout


def test_media_over_media_timeout_is_a_408_and_the_server_goes_on(server_model_dir, tmp_path, silent_host):
    """--media-timeout bounds loading and decoding whatever the download limits say (here a 30 s connect
    timeout): the request gets 408 media_timeout, and the server keeps answering."""
    srv = ServerProcess(server_model_dir, tmp_path, "--allow-private-media-hosts", "--media-connect-timeout", "30",
                        "--media-timeout", "1")
    try:
        srv.wait_ready()
        for body in (image_body(f"{silent_host}/image.png"), video_body(f"{silent_host}/v.mp4")):
            t0 = time.monotonic()
            err = assert_openai_error(post(srv, body), 408)
            assert err["code"] == "media_timeout" and "media_timeout=1 s" in err["message"]
            assert time.monotonic() - t0 < 8
        text = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]}
        assert post(srv, text).status_code == 200
    finally:
        srv.stop()


# -- no server paths in error messages -----------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(media_root, tmp_path_factory) -> dict[str, Path]:
    """Files under the allowed root: a symlink to a file outside, a symlink inside, broken media."""
    from tests.media.synth import write_video

    outside = tmp_path_factory.mktemp("secret-place")
    (outside / "target.png").write_bytes(png_bytes())
    d = media_root / "sec"
    d.mkdir(exist_ok=True)
    links = {"out_link": d / "escape.png", "in_link": d / "alias.png", "loop": d / "loop.png"}
    for link in links.values():
        if link.is_symlink():
            link.unlink()
    os.symlink(outside / "target.png", links["out_link"])
    (d / "hidden-name.png").write_bytes(png_bytes())
    os.symlink(d / "hidden-name.png", links["in_link"])
    os.symlink(links["loop"], links["loop"])
    (d / "broken.mp4").write_bytes(os.urandom(20000))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    write_video(str(d / "whole.mp4"), 60, faststart=True)
    data = (d / "whole.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])  # index intact, frame data cut
    return {"root": media_root, "outside": outside, "dir": d, **links}


def assert_no_server_paths(text: str, planted: dict) -> None:
    for secret in (str(planted["root"]), str(planted["outside"]), str(Path(planted["root"]).resolve()),
                   "target.png", "hidden-name.png"):
        assert secret not in text, text


@pytest.mark.parametrize(("kind", "rel", "status", "fragment"), [
    ("image", "sec/missing.png", 400, "media file not found: sec/missing.png"),
    ("video", "sec/missing.mp4", 400, "media file not found: sec/missing.mp4"),
    ("image", "sec/escape.png", 400, "sec/escape.png is outside the allowed local media path"),
    ("video", "sec/escape.png", 400, "sec/escape.png is outside the allowed local media path"),
    ("image", "sec/broken.png", 400, "sec/broken.png: "),
    ("video", "sec/broken.mp4", 400, "sec/broken.mp4: "),
    ("video", "sec/alias.png", 400, "sec/alias.png: "),  # an image as a video, through a symlink inside
    ("image", "sec/loop.png", 400, "sec/loop.png"),  # a symlink to itself
])
def test_errors_do_not_reveal_server_paths(server, planted, kind, rel, status, fragment):
    needs_media()
    make = image_body if kind == "image" else video_body
    absolute = str(planted["root"] / rel)
    for url in (rel, absolute, Path(absolute).as_uri()):
        r = post(server, make(url))
        err = assert_openai_error(r, status)
        assert fragment in err["message"], (url, err["message"])
        assert_no_server_paths(r.text, planted)


def test_truncated_video_error_names_client_path(server, planted):
    # probing succeeds (the index is intact): frames are decoded later, inside the engine
    needs_media()
    r = post(server, video_body("sec/cut.mp4"))
    assert_no_server_paths(r.text, planted)
    if r.status_code != 200:
        assert "sec/cut.mp4" in assert_openai_error(r, 400)["message"]
