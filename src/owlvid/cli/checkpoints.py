"""`owlvid info` (architecture, variant, parameters) and `owlvid download` (into the Hugging Face cache)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .common import _load_model, _model_name


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoint import checkpoint_shapes

    folder = _checkpoint_without_tokenizer(args)
    if folder is None:
        model = _load_model(args)
        info = model.describe()
        folder = Path(model.runtime.folder)
        shapes = checkpoint_shapes(folder)
    else:  # describe what config.json and the weights say: nothing here needs a tokenizer
        from ..checkpoint import read_config
        from ..models import runtime_class

        raw = read_config(folder)
        shapes = checkpoint_shapes(folder)
        info = {"name": _model_name(args), "folder": str(folder),
                "architecture": runtime_class(raw.get("model_type", "")).architecture,
                "model_type": raw.get("model_type"),
                "tokenizer": "none in the checkpoint folder (ask/chat/serve need --tokenizer DIR)",
                "parameters": sum(math.prod(shape) for shape in shapes.values())}
    prefixes: dict[str, int] = {}
    for key in shapes:
        top = key.split(".")[0]
        prefixes[top] = prefixes.get(top, 0) + 1
    info["checkpoint"] = {"files": sorted(p.name for p in folder.iterdir() if p.is_file()),
                          "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
                          "tensors": len(shapes), "tensors_by_module": prefixes}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "parameters" and isinstance(value, int):
            value = f"{value:,} ({_human(value)})"
        elif key == "checkpoint":
            value = (f"{value['tensors']} tensors, {_human(value['size_bytes'], 'B', 1024)} in "
                     f"{', '.join(value['files'])}; " + ", ".join(f"{k}: {n}" for k, n in
                                                                    value["tensors_by_module"].items()))
        elif isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value)
        print(f"{key:<{width}}  {value}")
    return 0


def _checkpoint_without_tokenizer(args: argparse.Namespace) -> Path | None:
    """The checkpoint folder when it has no tokenizer files and --tokenizer is not given, else None."""
    from ..checkpoint import resolve_checkpoint
    from ..errors import CheckpointError
    from ..tokenizer import QwenTokenizer

    if args.tokenizer:
        return None
    folder = resolve_checkpoint(_model_name(args), revision=args.revision)
    try:
        QwenTokenizer.from_dir(folder)
    except CheckpointError:
        return folder
    return None


def _human(n: float, unit: str = "", base: int = 1000) -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < base or prefix == "T":
            return f"{n:.1f} {prefix}{unit}".replace(".0 ", " ") if prefix else f"{int(n)} {unit}".strip()
        n /= base
    return str(n)


def cmd_download(args: argparse.Namespace) -> int:
    from ..checkpoint import download_checkpoint, resolve_checkpoint

    name = _model_name(args)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        folder = resolve_checkpoint(path)
    else:
        folder = download_checkpoint(name, revision=args.revision, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"model": name, "path": str(folder)}))
    else:
        print(folder)
    return 0


