"""Other web pages and DNS rebinding, in a real Chromium: a page of another origin cannot drive the server
(not even with `no-cors` requests, which need no CORS approval), a page reaching the server under a foreign
host name is refused, and --allowed-origins / --allowed-hosts let exactly the named ones in."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from ..server.helpers import ServerProcess, png_bytes
from .conftest import CHROMIUM_ARGS, PageErrors, chromium_path, static_site

REBIND_NAME = "rebind.test"  # Chromium resolves it to 127.0.0.1 (--host-resolver-rules), as DNS rebinding does

# Every way a page can send an upload or a URL fetch to another origin; returns what the page could see.
ATTACK = """async ([url, png]) => {
  const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
  const out = {};
  const tries = {
    nocors_upload: () => fetch(url + "/v1/uploads?filename=a.png",
                               {method: "POST", mode: "no-cors", body: new Blob([bytes])}),
    cors_upload: () => fetch(url + "/v1/uploads?filename=b.png", {method: "POST", body: new Blob([bytes])}),
    nocors_url: () => fetch(url + "/v1/uploads/url", {method: "POST", mode: "no-cors",
                                                      body: JSON.stringify({url: "https://example.com/a.png"})}),
    models: () => fetch(url + "/v1/models").then(r => r.text()),
  };
  for (const [name, run] of Object.entries(tries)) {
    try { const r = await run(); out[name] = typeof r === "string" ? r : (r.type === "opaque" ? "opaque" : r.status); }
    catch (e) { out[name] = "blocked"; }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def foreign_site(tmp_path_factory):
    """http://127.0.0.1:PORT serving an empty page: another web site on this machine (another origin)."""
    root = tmp_path_factory.mktemp("foreign-site")
    (root / "index.html").write_text("<!doctype html><title>another site</title><p>hello</p>")
    with static_site(root) as url:
        yield url


@pytest.fixture(scope="module")
def rebinding_browser(browser):
    """A Chromium whose DNS answers 127.0.0.1 for rebind.test (what a rebinding attacker's DNS does), from
    the same Playwright as `browser` (one Playwright per process)."""
    rebinding = browser.browser_type.launch(executable_path=chromium_path(),
                                            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBIND_NAME} 127.0.0.1"])
    try:
        yield rebinding
    finally:
        rebinding.close()


@pytest.fixture(scope="module")
def allowing_server(web_checkpoint, foreign_site, tmp_path_factory):
    """Allows the foreign site's page (by origin) and the rebind.test name."""
    folder, tokenizer = web_checkpoint
    uploads = tmp_path_factory.mktemp("allowing-uploads")
    proc = ServerProcess(folder, tmp_path_factory.mktemp("allowing-logs"), "--tokenizer", str(tokenizer),
                         "--upload-dir", str(uploads), "--allowed-origins", foreign_site,
                         "--allowed-hosts", REBIND_NAME)
    proc.upload_dir = uploads
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def stored(server) -> list[Path]:
    return [p for p in server.upload_dir.rglob("*") if p.is_file()]


def attack(browser, page_url: str, server_url: str) -> dict:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(page_url)
        return page.evaluate(ATTACK, [server_url, base64.b64encode(png_bytes()).decode()])
    finally:
        context.close()


def test_a_foreign_page_cannot_upload_or_read(browser, web_server, foreign_site):
    before = stored(web_server)
    seen = attack(browser, foreign_site + "/", web_server.url)
    # no-cors requests are sent (the page just cannot read the answer): the server itself must refuse them
    assert seen == {"nocors_upload": "opaque", "cors_upload": "blocked", "nocors_url": "opaque", "models": "blocked"}
    assert stored(web_server) == before  # nothing stored
    # what the browser sent, replayed: refused with 403 before the body is read
    origin = httpx.post(web_server.url + "/v1/uploads", params={"filename": "a.png"}, content=png_bytes(),
                        headers={"Origin": foreign_site}, timeout=30)
    assert origin.status_code == 403 and origin.json()["error"]["code"] == "origin_not_allowed"
    assert foreign_site in origin.json()["error"]["message"] and stored(web_server) == before
    assert httpx.get(web_server.url + "/health", timeout=10).status_code == 200


def test_a_page_under_a_rebound_name_is_refused(rebinding_browser, web_server):
    port = web_server.url.rsplit(":", 1)[1]
    context = rebinding_browser.new_context()
    try:
        page = context.new_page()
        response = page.goto(f"http://{REBIND_NAME}:{port}/")
        assert response.status == 403 and "host_not_allowed" in response.text()
        # the page's own origin is rebind.test: same-origin reads are refused too
        assert page.evaluate("() => fetch('/v1/models').then(r => r.status)") == 403
    finally:
        context.close()


def test_the_server_own_page_still_works_by_every_loopback_name(browser, web_server):
    port = web_server.url.rsplit(":", 1)[1]
    for base in (web_server.url, f"http://localhost:{port}"):
        context = browser.new_context()
        try:
            page = context.new_page()
            assert page.goto(base + "/").status == 200
            seen = page.evaluate("() => fetch('/v1/models').then(r => r.json())")
            assert seen["data"][0]["id"] == web_server.name
            upload = page.evaluate("""async (png) => {
                const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
                const r = await fetch('/v1/uploads?filename=own.png', {method: 'POST', body: new Blob([bytes])});
                return [r.status, (await r.json()).kind];
            }""", base64.b64encode(png_bytes()).decode())
            assert upload == [200, "image"]
        finally:
            context.close()


def test_allowed_origins_and_hosts_let_exactly_them_in(browser, rebinding_browser, allowing_server, foreign_site):
    before = stored(allowing_server)
    seen = attack(browser, foreign_site + "/", allowing_server.url)
    assert seen["cors_upload"] == 200 and seen["nocors_upload"] == "opaque"  # CORS answers: the page reads them
    assert '"object":"list"' in seen["models"]
    assert len(stored(allowing_server)) == len(before) + 2  # both uploads stored
    # the same site under another name is another origin: still refused
    port = foreign_site.rsplit(":", 1)[1]
    other = attack(browser, f"http://localhost:{port}/", allowing_server.url)
    assert other["cors_upload"] == "blocked" and other["models"] == "blocked"
    assert len(stored(allowing_server)) == len(before) + 2
    # rebind.test is allowed by name: the page loads and works
    context = rebinding_browser.new_context()
    try:
        page = context.new_page()
        assert page.goto(f"http://{REBIND_NAME}:{allowing_server.url.rsplit(':', 1)[1]}/").status == 200
        assert page.evaluate("() => fetch('/v1/models').then(r => r.status)") == 200
    finally:
        context.close()


def test_the_page_loads_without_any_console_error(browser, web_server):
    """Not even the browser's own icon request may fail (a 404 for /favicon.ico is a console error)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        errors = PageErrors(page)
        page.goto(web_server.url + "/")
        # the page names its icon (else Chromium asks for /favicon.ico), and the icon loads
        icon = page.evaluate("""async () => {
            const link = document.querySelector("link[rel~=icon]");
            if (!link) return null;
            const r = await fetch(link.href);
            return [r.status, r.headers.get("content-type")];
        }""")
        assert icon is not None and icon[0] == 200 and icon[1].startswith("image/")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1500)  # the browser's icon request and its console message come after the load
        assert errors.http == [] and errors.script == []
    finally:
        context.close()
    direct = httpx.get(web_server.url + "/favicon.ico", timeout=10)  # what other clients ask for
    assert direct.status_code == 200 and direct.headers["content-type"].startswith("image/")
