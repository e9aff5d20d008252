"""owlvid's OpenAI-compatible HTTP server (needs the `server` extra: `pip install 'owlvid[server]'`).

    from owlvid.server import ServerConfig, create_app
    app = create_app(owlvid.load(...), ServerConfig(served_model_name="owl3"))

FastAPI is imported only when `create_app` / `ServerConfig` are used, so `import owlvid.server` and
the scheduler work without it.
"""

from __future__ import annotations

from typing import Any

from .scheduler import Job, JobCancelled, JobTimeout, QueueFullError, Scheduler

__all__ = ["create_app", "ServerConfig", "Scheduler", "Job", "JobCancelled", "JobTimeout", "QueueFullError",
           "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServerConfig"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'owlvid.server' has no attribute {name!r}")


def serve(model: Any, config: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          ready_message: bool = True) -> None:
    """Run the server with uvicorn until interrupted. Port 0 picks a free port (printed on stderr)."""
    import copy
    import dataclasses
    import socket
    import sys

    import uvicorn

    from .app import create_app

    if config.bind_host is None:  # the Host check's default names (server/origins.py)
        config = dataclasses.replace(config, bind_host=host)
    app = create_app(model, config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # owlvid's own lines (client errors) beside uvicorn's
    log_config["loggers"]["owlvid"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, log_config=log_config,
                                           timeout_graceful_shutdown=30))
    if ready_message:
        # printed before the first request can be served; clients should poll GET /health
        print(f"owlvid: serving {config.served_model_name!r} on http://{shown}:{bound} (OpenAI API at /v1, "
              "web page at /)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
