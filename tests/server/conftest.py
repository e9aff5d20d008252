"""Real `owlvid serve` processes on free loopback ports, talked to with the official `openai` package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("httpx")

from .helpers import API_KEY, LONG_TOKENS, ServerProcess, bunny_path, png_bytes, running_servers  # noqa: E402


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> Path:
    from owlvid.testing import make_tiny_owl3

    return make_tiny_owl3(tmp_path_factory.mktemp("server-model") / "tiny", "241101")


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    """The folder served with --allowed-local-media-path: a test image and (if present) the real video."""
    root = tmp_path_factory.mktemp("media-root")
    (root / "image.png").write_bytes(png_bytes())
    bunny = bunny_path()
    if bunny is not None:
        shutil.copy(bunny, root / "bigbuckbunny.mp4")
    return root


@pytest.fixture(scope="session")
def local_model(server_model_dir):
    """The same checkpoint in-process: the reference for every answer (greedy decoding)."""
    import owlvid

    return owlvid.load(server_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def long_messages(local_model):
    """A prompt whose greedy answer runs for LONG_TOKENS tokens without an end token: a request that
    keeps the engine busy until its client goes away."""
    for i in range(10):
        messages = [{"role": "user", "content": f"Write a very long essay, part {i}."}]
        if local_model.generate(messages, max_new_tokens=LONG_TOKENS).completion_tokens == LONG_TOKENS:
            return messages
    pytest.skip("no prompt found whose greedy answer is long enough")


@pytest.fixture(scope="session")
def _servers(server_model_dir, media_root, tmp_path_factory):
    """Both servers start in parallel (each takes a few seconds to import torch and load)."""
    logs = tmp_path_factory.mktemp("server-logs")
    main = ServerProcess(server_model_dir, logs, "--allowed-local-media-path", str(media_root),
                         "--max-queued-requests", "64")
    strict = ServerProcess(server_model_dir, logs, "--api-key", API_KEY, "--max-request-bytes", "300000",
                           "--max-media-bytes", "100000", "--max-image-pixels", "1000000",
                           "--max-queued-requests", "1", "--max-batch", "1", "--max-frames", "16",
                           "--allowed-origins", "http://app.example.test")
    with running_servers(main=main, strict=strict) as servers:
        yield servers


@pytest.fixture(scope="session")
def server(_servers) -> ServerProcess:
    return _servers["main"]


@pytest.fixture(scope="session")
def strict_server(_servers) -> ServerProcess:
    """API key required, small body/media/pixel limits, queue of 1, no batching, at most 16 frames; the page
    origin http://app.example.test allowed."""
    return _servers["strict"]
