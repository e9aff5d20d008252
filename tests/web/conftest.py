"""The web page end to end: real `owlvid serve` processes (the tiny 241101 parity checkpoint with the real
Qwen2 tokenizer) driven over HTTP and from a real headless Chromium through Playwright's Python API.

Browsers cannot be downloaded here: the tests use the system Chromium (`apt-get install -y chromium`;
`OWLVID_CHROMIUM` names another binary) and skip, saying so, only when there is none.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from ..conftest import fixtures_or_skip  # noqa: E402
from ..media.synth import write_video  # noqa: E402
from ..server.helpers import API_KEY, ServerProcess, running_servers  # noqa: E402

# As root Chromium needs --no-sandbox; on a closed network the other flags keep it from stalling on
# connections it would open for updates, sync and field trials.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--no-first-run", "--disable-dev-shm-usage"]
MAX_MEDIA_BYTES = 2_000_000  # both servers: the real 1 MB video fits, a 2.5 MB file does not


def chromium_path() -> str | None:
    for candidate in (os.environ.get("OWLVID_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def web_checkpoint() -> tuple[Path, Path]:
    """(checkpoint folder, tokenizer folder): the real tokenizer makes the random answers printable text."""
    return fixtures_or_skip("owl3", "tiny-241101"), fixtures_or_skip("owl3", "tokenizer")


@pytest.fixture(scope="session")
def local_model(web_checkpoint):
    """The same checkpoint in-process: the reference for every answer (greedy decoding)."""
    import owlvid

    folder, tokenizer = web_checkpoint
    return owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Synthetic videos whose frames carry their index in the pixels (tests/media/synth.py), a corrupt one
    (a real MP4 cut short: it looks like a video but cannot be read), text, and a file over the limit."""
    root = tmp_path_factory.mktemp("web-media")
    out = {"clip": root / "clip.mp4", "other": root / "other.mp4"}
    write_video(out["clip"], 75)  # 3 s at 25 fps
    write_video(out["other"], 50, fps=10)  # 5 s at 10 fps
    out["corrupt"] = root / "corrupt.mp4"
    out["corrupt"].write_bytes(out["clip"].read_bytes()[:700])
    out["text"] = root / "notes.txt"
    out["text"].write_text("not a video\n" * 10)
    out["big"] = root / "big.mp4"
    out["big"].write_bytes(out["clip"].read_bytes() + os.urandom(MAX_MEDIA_BYTES + 500_000))
    return out


@pytest.fixture(scope="session")
def _web_servers(web_checkpoint, tmp_path_factory):
    folder, tokenizer = web_checkpoint
    logs = tmp_path_factory.mktemp("web-server-logs")
    uploads = tmp_path_factory.mktemp("web-uploads")
    common = ("--tokenizer", str(tokenizer), "--max-media-bytes", str(MAX_MEDIA_BYTES), "--max-new-tokens", "24")
    # the request body limit is below the real video's size: uploads must not go through it
    open_ = ServerProcess(folder, logs, *common, "--upload-dir", str(uploads), "--max-request-bytes", "400000")
    keyed = ServerProcess(folder, logs, *common, "--api-key", API_KEY, "--allow-private-media-hosts",
                          "--max-queued-requests", "1", "--max-batch", "1")
    open_.upload_dir = uploads
    with running_servers(open=open_, keyed=keyed) as servers:
        yield servers


@pytest.fixture(scope="session")
def web_server(_web_servers) -> ServerProcess:
    """No API key; uploads under `web_server.upload_dir`; request bodies at most 400,000 bytes."""
    return _web_servers["open"]


@pytest.fixture(scope="session")
def keyed_server(_web_servers) -> ServerProcess:
    """Needs API_KEY; may fetch media URLs from this machine (for the paste-a-URL test); one request at a
    time, and one waiting at most (for the server-busy test)."""
    return _web_servers["keyed"]


@contextlib.contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving `folder` (a web site of its own on this machine) while in the block."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture(scope="session")
def media_host(videos):
    """http://127.0.0.1:PORT serving the `videos` folder (for the URL uploads)."""
    with static_site(videos["clip"].parent) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright "
                                   "(pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary: apt-get install -y chromium (or set OWLVID_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageErrors:
    """JavaScript errors of a page: uncaught exceptions and console errors. Chromium also logs every HTTP
    error answer ("Failed to load resource: ... 400") as a console error: those are the server's answers
    the page shows in its banner, not script errors, and are kept apart."""

    def __init__(self, page) -> None:
        self.script: list[str] = []
        self.http: list[str] = []
        page.on("pageerror", lambda e: self.script.append(f"uncaught: {e}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        (self.http if message.text.startswith("Failed to load resource") else self.script).append(message.text)


@pytest.fixture()
def open_page(browser):
    """`open_page(server)` -> a fresh browser context's page on the server's web page; after the test, the
    page must have had no JavaScript error."""
    contexts = []

    def open_(server, viewport=(1280, 860)):
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.errors = PageErrors(page)
        page.goto(server.url + "/")
        return page

    yield open_
    try:
        for context in contexts:
            for page in context.pages:
                assert page.errors.script == [], f"JavaScript errors: {page.errors.script}"
    finally:
        for context in contexts:
            context.close()
