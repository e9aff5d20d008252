"""The media package's structure: modules import downward only (no cycle, also not inside functions),
no reader imports the entry points, and no module grows past ~450 lines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import owlvid.media

PACKAGE = Path(owlvid.media.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def media_imports(module: str) -> set[str]:
    """Sibling modules `module` imports anywhere in its source (top level or inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("owlvid.media."):
                found.add(node.module.split(".")[2])
            elif node.level == 0 and node.module == "owlvid.media":
                found.add("__init__")
            elif node.level > 1:
                found.add("..")  # reaches above owlvid.media
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("owlvid.media."))
    return found & (set(MODULES) | {"__init__", ".."})


def test_no_import_cycles_and_nothing_imports_upward():
    graph = {m: media_imports(m) for m in MODULES}
    for m, deps in graph.items():
        assert "__init__" not in deps and ".." not in deps, f"{m} imports the package or above it"
    # the entry points are the top: no reader or helper imports them
    assert [m for m, deps in graph.items() if "video" in deps] == []
    order: list[str] = []  # topological sort: fails on a cycle
    pending = dict(graph)
    while pending:
        ready = [m for m, deps in pending.items() if deps <= set(order)]
        assert ready, f"import cycle among {sorted(pending)}: {pending}"
        order.extend(sorted(ready))
        for m in ready:
            del pending[m]


def test_every_module_imports_alone_and_is_small():
    for m in MODULES:
        importlib.import_module(f"owlvid.media.{m}")
        lines = len((PACKAGE / f"{m}.py").read_text().splitlines())
        assert lines <= 450, f"media/{m}.py has {lines} lines"


def test_public_names_unchanged():
    expected = {
        "BACKENDS", "DECODE_STRATEGIES", "DEFAULT_IMAGE_MAX_BYTES", "DEFAULT_IMAGE_TIMEOUT", "DEFAULT_MAX_PIXELS",
        "DEFAULT_VIDEO_MAX_BYTES", "DEFAULT_VIDEO_TIMEOUT", "MAX_FRAMES_HARD_CAP", "MediaFetchError",
        "MediaTimeoutError", "MediaTooLargeError", "MediaWarning", "PRESETS", "VideoClip", "VideoSampling",
        "frame_at_times", "iter_video_chunks", "list_frame_files", "load_image", "load_video", "probe_video",
        "sample_indices", "sniff_kind",
    }
    assert expected <= set(owlvid.media.__all__)
    for name in owlvid.media.__all__:
        assert getattr(owlvid.media, name) is not None
    from owlvid.media import video

    assert video.VIDEO_DEMUXERS and video.FRAME_IMAGE_EXTENSIONS and video.BACKENDS == ("pyav", "torchcodec")
