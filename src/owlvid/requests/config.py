"""The settings of a request policy: the server's flags, also used by batch jobs and Ray replicas (which
answer the same request bodies under the same limits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20


@dataclass
class ServerConfig:
    """Everything the server needs besides the model; the CLI flags map one to one."""

    served_model_name: str = "owlvid"
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    max_request_bytes: int = 100 * MiB
    max_media_bytes: int = 256 * MiB
    download_timeout: float = 60.0
    # http(s) media: only public hosts unless opted in; checked after DNS and on every redirect
    allowed_media_domains: list[str] | None = None
    allow_private_media_hosts: bool = False
    media_connect_timeout: float = 10.0
    max_frames: int = 128
    max_image_pixels: int = 40_000_000
    max_media_per_request: int = 32
    max_queued_requests: int = 64
    max_pending_media_bytes: int | None = None  # decoded media held by queued requests (None: no budget)
    max_batch: int = 8  # requests decoded together (continuous batching), where the model supports it
    request_timeout: float = 600.0
    media_timeout: float | None = None  # seconds one image/video may take to load and decode (408 after)
    # defaults of a request that does not say
    default_max_tokens: int = 512
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_seed: int | None = None
    video_options: dict[str, Any] = field(default_factory=dict)  # max_frames / fps / sampling
    cut_enable: bool | None = None
    # uploads of the web page (POST /v1/uploads): each at most max_media_bytes, deleted `upload_ttl` seconds
    # after their last use; all of them together at most `max_upload_storage_bytes` on disk
    upload_dir: str | None = None  # None: a temporary folder, removed at shutdown
    upload_ttl: float = 3600.0
    max_upload_storage_bytes: int = 4096 * MiB
    # which host names and web pages may use the server (server/origins.py): the address it listens on (set
    # by `serve`; None counts as loopback), more names for the Host header and more page origins (CORS) than
    # the server's own ("*": any)
    bind_host: str | None = None
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] | None = None


def public_model_name(model: str) -> str:
    """How the API names a checkpoint: a hub id as is, a local folder by its name only (the server's folders
    are never shown to clients)."""
    from ..checkpoint import is_hub_id

    return model if is_hub_id(model) else Path(model).expanduser().name or "owlvid"
