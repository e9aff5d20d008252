"""`owlvid ask` (one question, streamed) and `owlvid chat` (multi-turn, media kept across turns)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import OwlvidError
from .common import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    UsageError,
    _generation_kwargs,
    _is_url,
    _load_model,
    _model_name,
    _one_line,
    _result_json,
    _stream_answer,
    check_media,
    media_kind,
    media_part,
)

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
            from ..video_plan import load_video_frames

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


