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
import os
import sys
from collections.abc import Sequence

from ..errors import InputError, OwlvidError
from .chat import CHAT_HELP, cmd_ask, cmd_chat
from .checkpoints import cmd_download, cmd_info
from .common import (
    UsageError,
    _generation_options,
    _load_model,
    _lora_options,
    _model_options,
    _non_negative_int,
    _one_line,
    _Parser,
    _positive_float,
    _positive_int,
    _ray_options,
    media_kind,
)
from .jobs import cmd_batch, cmd_serve, eval_on_ray

__all__ = ["build_parser", "main", "media_kind"]


# -- parser and entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

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

    from ..eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub, [model_opts], _load_model, debug, _positive_int, (_ray_options(automatic=True), eval_on_ray))

    from .plan import add_parser as add_plan_parser

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
