"""The `owlvid` command line: ask, chat, serve, batch, eval, info, plan, download.

    owlvid ask photo.jpg clip.mp4 "What happens after the photo was taken?"
    owlvid chat --model mPLUG/mPLUG-Owl3-7B-241101 clip.mp4
    owlvid serve --port 8000 --api-key SECRET --allowed-local-media-path /data
    owlvid batch -i requests.jsonl -o answers.jsonl --model mPLUG/mPLUG-Owl3-7B-241101
    owlvid eval mvbench --data /data/MVBench --model mPLUG/mPLUG-Owl3-7B-241101 -o runs/mvbench
    owlvid info mPLUG/mPLUG-Owl3-2B-241014 --json
    owlvid plan mPLUG/mPLUG-Owl3-7B-241101 --max-memory cuda:0=14GiB,cuda:1=14GiB --max-frames 64
    owlvid download mPLUG/mPLUG-Owl3-7B-241101

Errors are one line `owlvid: error: ...` on stderr (`--debug` shows the traceback); the exit code is 2
for usage and input errors (bad arguments, missing or unreadable media, invalid request) and 1 for
anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import InputError, OwlvidError

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
        from .media import sniff_kind

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
    return p


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


def _ray_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("Ray (pip install 'owlvid[ray]')")
    g.add_argument("--ray", action="store_true", help="run on a Ray cluster, one model per replica")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the cluster (default: RAY_ADDRESS, or a new local one)")
    g.add_argument("--num-replicas", type=_positive_int, default=1, metavar="N", help="model replicas (default: 1)")
    g.add_argument("--gpus-per-replica", type=_non_negative_float, default=0.0, metavar="G",
                   help="GPUs each replica reserves (default: 0)")
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
    from .api import DEFAULT_MODEL

    return getattr(args, "model_arg", None) or args.model or DEFAULT_MODEL


def _load_model(args: argparse.Namespace):
    from .api import load

    name = _model_name(args)
    tty = sys.stderr.isatty()
    if not tty:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if tty:
        print(f"owlvid: loading {name} ...", file=sys.stderr, end="\r", flush=True)
    model = load(name, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, revision=args.revision,
                 quantize=args.quantize, adapter=args.adapter, lora_modules=_lora_modules(args))
    if tty:
        print(" " * (len(name) + 24), file=sys.stderr, end="\r", flush=True)
    return model


def _result_json(model_name: str, g: Any) -> dict:
    return {"model": model_name, "text": g.text, "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "timings": g.timings}


def _stream_answer(model: Any, messages: list[dict], kwargs: dict, out: Any) -> Any:
    """Write the answer to `out` as it is generated; return the final Generation."""
    from .engine import Generation, TokenEvent

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


# -- commands -----------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    *sources, question = args.inputs
    if not sources and (Path(question).suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
                        and (Path(question).exists() or _is_url(question))):
        raise UsageError(f"{question!r} looks like a media file: put the question after it, "
                         "e.g. owlvid ask clip.mp4 \"What happens?\"")
    parts = [media_part(s) for s in sources]
    parts.append({"type": "text", "text": question})
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": parts})
    model = _load_model(args)
    kwargs = _generation_kwargs(args)
    if args.json:
        g = model.generate(messages, **kwargs)
        print(json.dumps(_result_json(_model_name(args), g), ensure_ascii=False))
    else:
        _stream_answer(model, messages, kwargs, sys.stdout)
    return 0


CHAT_HELP = """commands:
  /image PATH   attach an image to your next message
  /video PATH   attach a video to your next message
  /reset        forget the conversation
  /save FILE    write the conversation as JSON
  /quit         leave (also Ctrl-D)"""


class ChatSession:
    """The state of `owlvid chat`: history (as saved: media as paths) and decoded media."""

    def __init__(self, model: Any, kwargs: dict, system: str | None = None) -> None:
        self.model = model
        self.kwargs = kwargs
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.saved: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.live: list[dict] = list(self.saved)
        self.pending: list[tuple[dict, dict]] = []  # (saved part, live part)

    def attach(self, source: str, kind: str) -> None:
        part = media_part(source, kind)
        live = dict(part)
        if kind == "video":  # decode once, reuse the frames on every later turn
            from .video_plan import load_video_frames

            opts = {k: self.kwargs[k] for k in ("max_frames", "fps", "sampling") if k in self.kwargs}
            live = {"type": "video", "video": load_video_frames(source, self.model.runtime, opts)}
        self.pending.append((part, live))

    def ask(self, text: str, out: Any, as_json: bool = False) -> Any:
        text_part = {"type": "text", "text": text}
        saved_msg = {"role": "user", "content": [p for p, _ in self.pending] + [text_part]}
        live_msg = {"role": "user", "content": [p for _, p in self.pending] + [text_part]}
        if as_json:
            g = self.model.generate(self.live + [live_msg], **self.kwargs)
            out.write(json.dumps(_result_json(self.model.name, g), ensure_ascii=False) + "\n")
            out.flush()
        else:
            g = _stream_answer(self.model, self.live + [live_msg], self.kwargs, out)
        answer = {"role": "assistant", "content": g.text}
        self.saved += [saved_msg, answer]
        self.live += [live_msg, answer]
        self.pending = []
        return g

    def save(self, file: str) -> None:
        data = {"model": self.model.name, "messages": self.saved}
        text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        Path(file).expanduser().write_text(text, encoding="utf-8")


def cmd_chat(args: argparse.Namespace) -> int:
    for source in args.media:
        check_media(source)
    model = _load_model(args)
    session = ChatSession(model, _generation_kwargs(args), args.system)
    for source in args.media:
        session.attach(source, media_kind(source))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"owlvid chat with {model.name} — /help for commands, /quit to leave", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            print(file=sys.stderr)
            break
        if not interactive and line == "":
            break  # end of scripted input
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if command in ("/quit", "/exit", "/q"):
                    break
                elif command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                elif command in ("/image", "/video"):
                    if not rest:
                        raise UsageError(f"{command} needs a path or URL")
                    session.attach(rest, command[1:])
                    print(f"owlvid: {command[1:]} {rest} attached to your next message", file=sys.stderr)
                elif command == "/reset":
                    session.reset()
                    print("owlvid: conversation cleared", file=sys.stderr)
                elif command == "/save":
                    if not rest:
                        raise UsageError("/save needs a file name")
                    session.save(rest)
                    print(f"owlvid: conversation saved to {rest}", file=sys.stderr)
                else:
                    raise UsageError(f"unknown command {command} (/help lists them)")
            except (OwlvidError, UsageError, OSError) as e:
                print(f"owlvid: error: {_one_line(e)}", file=sys.stderr, flush=True)
            continue
        try:
            session.ask(line, sys.stdout, as_json=args.json)
        except (OwlvidError, OSError) as e:
            print(f"owlvid: error: {_one_line(e)}", file=sys.stderr, flush=True)
    return 0


def _domain_list(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    domains = [d.strip() for v in values for d in v.split(",") if d.strip()]
    if not domains:
        raise UsageError("--allowed-media-domains needs at least one host name")
    return domains


def _origin_list(values: list[str] | None) -> list[str] | None:
    """--allowed-origins: web page origins, scheme://host[:port] (no path), `null` or `*`."""
    if values is None:
        return None
    origins = [o.strip().rstrip("/") for v in values for o in v.split(",") if o.strip()]
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin not in ("*", "null") and (scheme.lower() not in ("http", "https") or not sep or not rest
                                             or any(c in rest for c in "/?#@")):
            raise UsageError(f"--allowed-origins {origin}: give a web page origin like http://localhost:3000 "
                             "(scheme, host and port only), or *")
    if not origins:
        raise UsageError("--allowed-origins needs at least one origin")
    return origins


def _host_list(values: list[str] | None) -> list[str] | None:
    """--allowed-hosts: host names or addresses (a port is ignored), or `*`."""
    if values is None:
        return None
    hosts = [h.strip() for v in values for h in v.split(",") if h.strip()]
    for host in hosts:
        if any(c in host for c in "/?#@ "):
            raise UsageError(f"--allowed-hosts {host}: give a host name like myserver.example.com, or *")
    if not hosts:
        raise UsageError("--allowed-hosts needs at least one host name")
    return hosts


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise OwlvidError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'owlvid[server]'") from None
    from .requests import ServerConfig, public_model_name
    from .server import serve

    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).expanduser().is_dir():
        raise UsageError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    video_options = {k: getattr(args, k) for k in ("max_frames", "fps", "sampling")
                     if getattr(args, k) is not None}
    config = ServerConfig(
        served_model_name=args.served_model_name or public_model_name(_model_name(args)),
        api_key=args.api_key or os.environ.get("OWLVID_API_KEY") or None,
        allowed_local_media_path=args.allowed_local_media_path,
        max_request_bytes=args.max_request_bytes, max_media_bytes=args.max_media_bytes,
        download_timeout=args.download_timeout, max_frames=args.max_frames or ServerConfig.max_frames,
        max_image_pixels=args.max_image_pixels, max_media_per_request=args.max_media_per_request,
        max_queued_requests=args.max_queued_requests, max_batch=args.max_batch, request_timeout=args.request_timeout,
        max_pending_media_bytes=args.max_pending_media_bytes, media_timeout=args.media_timeout,
        default_max_tokens=args.max_new_tokens, default_temperature=args.temperature,
        default_top_p=args.top_p, default_seed=args.seed, video_options=video_options,
        cut_enable=False if args.no_cut else None)
    config.allowed_media_domains = _domain_list(args.allowed_media_domains)
    config.allow_private_media_hosts = args.allow_private_media_hosts
    config.media_connect_timeout = args.media_connect_timeout
    config.upload_dir, config.upload_ttl = args.upload_dir, args.upload_ttl
    config.bind_host = args.host
    config.allowed_origins, config.allowed_hosts = _origin_list(args.allowed_origins), _host_list(args.allowed_hosts)
    if not config.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"owlvid: warning: serving on {args.host} without --api-key: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    if args.ray:
        from . import ray as owlvid_ray

        owlvid_ray.serve(_model_name(args), config, host=args.host, port=args.port, log_level=args.log_level,
                         **_ray_arguments(args), **_load_arguments(args))
        return 0
    _ray_arguments(args)  # none without --ray
    model = _load_model(args)
    serve(model, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _ray_arguments(args: argparse.Namespace) -> dict[str, Any]:
    if not args.ray and any(getattr(args, k) != v for k, v in RAY_DEFAULTS.items()):
        raise UsageError("--ray-address, --num-replicas, --gpus-per-replica and --cpus-per-replica need --ray")
    return {k: getattr(args, k) for k in RAY_DEFAULTS}


def _load_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """What every Ray replica passes to owlvid.load (each loads the model itself)."""
    return {"device": args.device, "dtype": args.dtype, "tokenizer": args.tokenizer, "revision": args.revision,
            "quantize": args.quantize, "adapter": args.adapter, "lora_modules": _lora_modules(args)}


def cmd_batch(args: argparse.Namespace) -> int:
    from . import batch

    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).expanduser().is_dir():
        raise UsageError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    common = {"allowed_local_media_path": args.allowed_local_media_path, "max_batch": args.max_batch,
              "progress": not args.no_progress, "json_progress": args.json_progress,
              "media_timeout": args.media_timeout, "prefetch": args.prefetch}
    if args.ray:
        from . import ray as owlvid_ray

        summary = owlvid_ray.run(Path(args.input).expanduser(), Path(args.output).expanduser(), _model_name(args),
                                 **common, **_ray_arguments(args), **_load_arguments(args))
    else:
        _ray_arguments(args)
        summary = batch.run(Path(args.input).expanduser(), Path(args.output).expanduser(),
                            lambda: _load_model(args), **common)
    print(f"owlvid: batch: {summary['requests']} request(s): {summary['completed']} answered, "
          f"{summary['failed']} failed, {summary['skipped']} already in {summary['output']}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_shapes

    folder = _checkpoint_without_tokenizer(args)
    if folder is None:
        model = _load_model(args)
        info = model.describe()
        folder = Path(model.runtime.folder)
        shapes = checkpoint_shapes(folder)
    else:  # describe what config.json and the weights say: nothing here needs a tokenizer
        from .checkpoint import read_config
        from .models import runtime_class

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
    from .checkpoint import resolve_checkpoint
    from .errors import CheckpointError
    from .tokenizer import QwenTokenizer

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
    from .checkpoint import download_checkpoint, resolve_checkpoint

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


# -- parser and entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    model_opts, gen_opts, ray_opts, lora_opts = _model_options(), _generation_options(), _ray_options(), _lora_options()
    parser = _Parser(prog="owlvid", description="Inference for cross-attention video / multi-image LLMs "
                     "(mPLUG-Owl3, Slow-Fast).")
    parser.add_argument("--version", action="version", version=f"owlvid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # also accepted after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("ask", parents=[model_opts, gen_opts, debug], help="answer one question about images/videos",
                       description="Answer a question about images and videos (paths or URLs, in order); the "
                       "answer is streamed to stdout.")
    p.add_argument("inputs", nargs="+", metavar="MEDIA... QUESTION",
                   help="media paths/URLs, then the question")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the answer, usage and timings")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", parents=[model_opts, gen_opts, debug], help="interactive multi-turn chat",
                       description="Multi-turn chat with streaming answers. " + CHAT_HELP.replace("\n", " "),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("media", nargs="*", metavar="MEDIA", help="images/videos attached to the first message")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json", action="store_true", help="print each answer as one JSON line")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", parents=[model_opts, gen_opts, ray_opts, lora_opts, debug],
                       help="OpenAI-compatible HTTP server",
                       description="Serve the model with an OpenAI-compatible API "
                       "(POST /v1/chat/completions, GET /v1/models, GET /health). Generation options set the "
                       "defaults of requests; "
                       "--max-frames is also the most frames a request may ask for.")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 picks a free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or set OWLVID_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: the --model hub id, or the name of its folder)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// URLs and plain paths under DIR (default: no local files)")
    p.add_argument("--max-request-bytes", type=_positive_int, default=100 * 2**20,
                   help="largest request body (default: 100 MiB)")
    p.add_argument("--max-media-bytes", type=_positive_int, default=256 * 2**20,
                   help="largest image or video file (default: 256 MiB)")
    p.add_argument("--max-image-pixels", type=_positive_int, default=40_000_000,
                   help="largest image in pixels (default: 40,000,000)")
    p.add_argument("--max-media-per-request", type=_positive_int, default=32,
                   help="images + videos per request (default: 32)")
    p.add_argument("--download-timeout", type=_positive_float, default=60.0,
                   help="seconds to fetch one http(s) media URL (default: 60)")
    p.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                   help="fetch http(s) media only from these host names (exact; space- or comma-separated; "
                   "checked on every redirect too; default: any public host)")
    p.add_argument("--allow-private-media-hosts", action="store_true",
                   help="also fetch http(s) media from loopback, private and link-local addresses (default: "
                   "refused; cloud metadata addresses are always refused)")
    p.add_argument("--media-connect-timeout", type=_positive_float, default=10.0,
                   help="seconds to connect to a media host and get its response headers (default: 10)")
    p.add_argument("--max-batch", type=_positive_int, default=8,
                   help="requests decoded together (continuous batching; 1 = one at a time)")
    p.add_argument("--max-queued-requests", type=_positive_int, default=64,
                   help="requests waiting for the engine before answering 503 (default: 64)")
    p.add_argument("--max-pending-media-bytes", type=_positive_int, default=None,
                   help="decoded media bytes that queued requests may hold before answering 503 (default: no limit)")
    p.add_argument("--media-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="seconds one image or video may take to load and decode; then 408 (default: no limit)")
    p.add_argument("--request-timeout", type=_positive_float, default=600.0,
                   help="seconds a request may take in all, queue included (default: 600)")
    p.add_argument("--upload-dir", default=None, metavar="DIR",
                   help="where the web page's uploads are written (default: a temporary folder)")
    p.add_argument("--upload-ttl", type=_positive_float, default=3600.0,
                   help="seconds an upload is kept after its last use (default: 3600)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="other web pages that may use the server, as scheme://host[:port] (space- or comma-"
                   "separated; * for any); they also get CORS answers (default: only the server's own page)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="more host names the server answers to (Host header; * for any); by default the --host "
                   "address, with localhost on loopback, any address and this machine's names on 0.0.0.0")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", parents=[model_opts, ray_opts, lora_opts, debug],
                       help="answer a file of OpenAI batch requests",
                       description="Answer every line of an OpenAI batch input file (POST /v1/chat/completions "
                       "requests) into an OpenAI batch output file. The whole input is checked first; each answer "
                       "is written as it completes; a rerun skips the custom_ids already in the output.")
    p.add_argument("-i", "--input", required=True, metavar="INPUT.jsonl", help="request lines")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                   help="output lines (appended to: an existing file resumes the job)")
    p.add_argument("--max-batch", type=_positive_int, default=8,
                   help="requests decoded together (continuous batching; 1 = one at a time)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow local paths and file:// URLs only under DIR (default: anywhere)")
    p.add_argument("--media-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="seconds one image or video may take to load and decode; past it the request gets a 408 "
                   "media_timeout line and the job goes on (default: no limit)")
    p.add_argument("--prefetch", type=_non_negative_int, default=2, metavar="N",
                   help="requests prepared (media decoded, vision encoded) ahead of the engine (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json-progress", action="store_true",
                   help="progress as one JSON object per line on stderr (done, failed, total, requests_per_s, "
                   "eta_s, elapsed_s) instead of the bar")
    p.set_defaults(func=cmd_batch)

    from .eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub, [model_opts], _load_model, debug, _positive_int)

    from .plan_cli import add_parser as add_plan_parser

    add_plan_parser(sub, debug, _positive_int)

    p = sub.add_parser("info", parents=[model_opts, debug], help="describe a checkpoint",
                       description="Architecture, variant, parameters, dtype, hyper layers and checkpoint "
                       "contents.")
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", parents=[debug], help="fetch a checkpoint into the Hugging Face cache",
                       description="Download a checkpoint's weights and tokenizer into the Hugging Face "
                       "cache and print its folder; a local folder just prints its path.")
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="hub id (default: owlvid.DEFAULT_MODEL)")
    p.add_argument("--model", "-m", default=None, help=argparse.SUPPRESS)
    p.add_argument("--revision", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_download)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"{e.strerror or 'file not found'}: {e.filename}"
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `owlvid ask ... | head`: not an error; silence the flush at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        if args.debug:
            raise
        print(f"owlvid: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OwlvidError, OSError) as e:
        if args.debug:
            raise
        print(f"owlvid: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an unforeseen failure: still one line, the traceback on request
        if args.debug:
            raise
        print(f"owlvid: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
