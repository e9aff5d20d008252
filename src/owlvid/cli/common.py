"""What the commands share: media arguments, option groups, value types, loading the model, streaming an
answer; usage errors as one line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                    ".jfif", ".heic", ".avif"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".flv", ".wmv", ".mpg", ".mpeg", ".3gp",
                    ".ts", ".mts", ".ogv", ".gifv"}


class UsageError(Exception):
    """A command-line mistake (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"owlvid: error: {message} (see '{self.prog} --help')\n")


# -- media arguments --------------------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return source.split(":", 1)[0].lower() in ("http", "https", "data", "file") and ":" in source


def media_kind(source: str) -> str:
    """'image' or 'video' for a path or URL: by extension, then by the file's first bytes."""
    if source.startswith("data:"):
        return "video" if source[5:].lower().startswith("video/") else "image"
    name = source.split("?", 1)[0].split("#", 1)[0] if _is_url(source) else source
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if not _is_url(source):
        try:
            with open(Path(source).expanduser(), "rb") as f:
                head = f.read(64)
        except OSError:
            head = b""
        from ..media import sniff_kind

        kind = sniff_kind(head) or ""
        if kind.endswith("video"):
            return "video"
    return "image"


def check_media(source: str) -> None:
    if _is_url(source) and not source.startswith("file:"):
        return
    path = Path(source[7:] if source.startswith("file://") else source).expanduser()
    if not path.exists():
        raise FileNotFoundError(2, "media file not found", str(source))
    if path.is_dir():
        raise InputError(f"{source} is a directory, not an image or video file")


def media_part(source: str, kind: str | None = None) -> dict:
    check_media(source)
    kind = kind or media_kind(source)
    return {"type": kind, kind: source}


# -- options ------------------------------------------------------------------------------------------


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="checkpoint folder or hub id (default: "
                   "owlvid.DEFAULT_MODEL)")
    g.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer files, if the checkpoint has none")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="store the language model's weights in int8 or group-wise int4 (torchao: "
                   "pip install 'owlvid[quant]'; default: unquantized)")
    g.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT / ms-swift) merged into the weights at load")
    g.add_argument("--device-map", default=None, choices=["auto", "balanced"],
                   help="split the model across devices as `owlvid plan` places it: auto fills them in order (the "
                   "rest to cpu when --max-memory lists it), balanced spreads the layers evenly over the GPUs")
    g.add_argument("--max-memory", default=None, type=_max_memory, metavar="DEV=SIZE,...",
                   help="with --device-map: what owlvid may use per device, e.g. cuda:0=14GiB,cuda:1=14GiB,cpu=64GiB "
                   "(default: every GPU less 1 GiB, and the available RAM as cpu)")
    return p


def _max_memory(text: str) -> dict[str, int]:
    from ..plan import parse_max_memory

    try:
        return parse_max_memory(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lora_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("LoRA adapters served side by side")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help="unmerged LoRA adapters; a request's `model` NAME picks one (the base model's name: none)")
    g.add_argument("--max-loras", type=_positive_int, default=None, metavar="N",
                   help="the most adapters kept on the device (all stay resident; default: as many as given)")
    return p


def _lora_modules(args: argparse.Namespace) -> dict[str, str] | None:
    """--lora-modules NAME=DIR ... as a dict (usage errors for malformed, repeated or too many names)."""
    specs = getattr(args, "lora_modules", None)  # only serve and batch have the flag
    if not specs:
        if getattr(args, "max_loras", None) is not None:
            raise UsageError("--max-loras needs --lora-modules")
        return None
    modules: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora-modules takes NAME=DIR, got {spec!r}")
        if name in modules:
            raise UsageError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    if args.max_loras is not None and len(modules) > args.max_loras:
        raise UsageError(f"--lora-modules gives {len(modules)} adapters but --max-loras is {args.max_loras}")
    base = getattr(args, "served_model_name", None) or _model_name(args)
    if base in modules:
        raise UsageError(f"adapter name {base!r} is the base model's name: requests could not reach the base")
    return modules


RAY_DEFAULTS = {"ray_address": None, "num_replicas": 1, "gpus_per_replica": 0.0, "cpus_per_replica": 1.0}
# `owlvid eval --ray`: a replica per GPU of the cluster (one on CPUs when it has none) unless told otherwise
AUTO_RAY_DEFAULTS = {**RAY_DEFAULTS, "num_replicas": None, "gpus_per_replica": None}


def _ray_options(automatic: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("Ray (pip install 'owlvid[ray]')")
    g.add_argument("--ray", action="store_true", help="run on a Ray cluster, one model per replica")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the cluster (default: RAY_ADDRESS, or a new local one)")
    g.add_argument("--num-replicas", type=_positive_int, default=None if automatic else 1, metavar="N",
                   help="model replicas (default: " + ("one per GPU of the cluster, or 1 without GPUs)" if automatic
                                                       else "1)"))
    g.add_argument("--gpus-per-replica", type=_non_negative_float, default=None if automatic else 0.0, metavar="G",
                   help="GPUs each replica reserves (default: " + ("1 if the cluster has GPUs, else 0: on CPUs)"
                                                                   if automatic else "0)"))
    g.add_argument("--cpus-per-replica", type=_non_negative_float, default=1.0, metavar="C",
                   help="CPUs each replica reserves; on CPU also its torch threads (default: 1)")
    return p


def _generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--max-frames", type=_positive_int, default=None, help="frames sampled per video at most")
    g.add_argument("--fps", type=_positive_float, default=None, help="frames per second sampled from videos")
    g.add_argument("--sampling", default=None, help="video frame-sampling preset (default: the model's)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="answer length limit (default: 512)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 disables it (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampled decoding")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer before this text (repeatable)")
    g.add_argument("--no-cut", action="store_true", help="do not cut large images into crops")
    return p


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                          "top_p": args.top_p, "top_k": args.top_k,
                          "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    for key in ("max_frames", "fps", "sampling"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.no_cut:
        kw["cut_enable"] = False
    if args.stop:
        kw["stop"] = args.stop
    return kw


def _model_name(args: argparse.Namespace) -> str:
    from ..api import DEFAULT_MODEL

    return getattr(args, "model_arg", None) or args.model or DEFAULT_MODEL


def _load_model(args: argparse.Namespace):
    from ..api import load

    name = _model_name(args)
    tty = sys.stderr.isatty()
    if not tty:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if tty:
        print(f"owlvid: loading {name} ...", file=sys.stderr, end="\r", flush=True)
    model = load(name, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, revision=args.revision,
                 quantize=args.quantize, adapter=args.adapter, lora_modules=_lora_modules(args),
                 **_split_arguments(args))
    if tty:
        print(" " * (len(name) + 24), file=sys.stderr, end="\r", flush=True)
    return model


def _split_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """--device-map / --max-memory as owlvid.load's arguments (a usage error when they do not go together)."""
    if args.max_memory is not None and args.device_map is None:
        raise UsageError("--max-memory needs --device-map auto or balanced")
    if args.device_map is not None and args.device != "auto":
        raise UsageError("give --device or --device-map, not both")
    return {"device_map": args.device_map, "max_memory": args.max_memory}


def _result_json(model_name: str, g: Any) -> dict:
    return {"model": model_name, "text": g.text, "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "timings": g.timings}


def _stream_answer(model: Any, messages: list[dict], kwargs: dict, out: Any) -> Any:
    """Write the answer to `out` as it is generated; return the final Generation."""
    from ..engine import Generation, TokenEvent

    result = None
    for event in model.iter_generate(messages, **kwargs):
        if isinstance(event, TokenEvent):
            if event.text:
                out.write(event.text)
                out.flush()
        elif isinstance(event, Generation):
            result = event
    out.write("\n")
    out.flush()
    return result


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"{e.strerror or 'file not found'}: {e.filename}"
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())
