"""`owlvid serve` (the OpenAI server: media, origin and host policy flags), `owlvid batch` (a job file) and the Ray
side of `owlvid eval --ray`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import OwlvidError
from .common import RAY_DEFAULTS, UsageError, _load_model, _lora_modules, _model_name, _split_arguments


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
    from ..requests import ServerConfig, public_model_name
    from ..server import serve

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
        from .. import ray as owlvid_ray

        owlvid_ray.serve(_model_name(args), config, host=args.host, port=args.port, log_level=args.log_level,
                         **_ray_arguments(args), **_load_arguments(args))
        return 0
    _ray_arguments(args)  # none without --ray
    model = _load_model(args)
    serve(model, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _ray_arguments(args: argparse.Namespace, defaults: dict[str, Any] = RAY_DEFAULTS) -> dict[str, Any]:
    if not args.ray and any(getattr(args, k) != v for k, v in defaults.items()):
        raise UsageError("--ray-address, --num-replicas, --gpus-per-replica and --cpus-per-replica need --ray")
    return {k: getattr(args, k) for k in defaults}


def eval_on_ray(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any] | None:
    """`owlvid eval BENCHMARK ... --ray`: the results of the run (`options`: owlvid.eval.run's) on Ray replicas;
    None without --ray (the run is then this process's)."""
    from .common import AUTO_RAY_DEFAULTS

    ray_args = _ray_arguments(args, AUTO_RAY_DEFAULTS)
    if not args.ray:
        return None
    from .. import ray_eval

    load = _load_arguments(args)
    del load["lora_modules"]  # eval has no --lora-modules: one model, merged adapter or none
    return ray_eval.run(args.benchmark, args.data, _model_name(args), args.output, **options, **ray_args, **load)


def _load_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """What every Ray replica passes to owlvid.load (each loads the model itself)."""
    return {"device": args.device, "dtype": args.dtype, "tokenizer": args.tokenizer, "revision": args.revision,
            "quantize": args.quantize, "adapter": args.adapter, "lora_modules": _lora_modules(args),
            **_split_arguments(args)}  # a replica splits its model over the devices it holds


def cmd_batch(args: argparse.Namespace) -> int:
    from .. import batch

    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).expanduser().is_dir():
        raise UsageError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    common = {"allowed_local_media_path": args.allowed_local_media_path, "max_batch": args.max_batch,
              "progress": not args.no_progress, "json_progress": args.json_progress,
              "media_timeout": args.media_timeout, "prefetch": args.prefetch}
    if args.ray:
        from .. import ray as owlvid_ray

        summary = owlvid_ray.run(Path(args.input).expanduser(), Path(args.output).expanduser(), _model_name(args),
                                 **common, **_ray_arguments(args), **_load_arguments(args))
    else:
        _ray_arguments(args)
        summary = batch.run(Path(args.input).expanduser(), Path(args.output).expanduser(),
                            lambda: _load_model(args), **common)
    print(f"owlvid: batch: {summary['requests']} request(s): {summary['completed']} answered, "
          f"{summary['failed']} failed, {summary['skipped']} already in {summary['output']}", file=sys.stderr)
    return 0


