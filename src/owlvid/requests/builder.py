"""The conversion of a validated chat-completions body into owlvid messages with decoded media and generation
options (`RequestBuilder`), under the request policy (`ServerConfig`) and its media rules (`MediaSources`:
local roots, URL policy). Errors are `APIError`s (OpenAI's error JSON). The server, batch jobs and Ray
replicas parse their requests with this very code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from ..errors import InputError
from ..media import MediaTooLargeError, NamedPath, UrlPolicy
from ..messages import check_seed, check_text
from . import schemas
from .config import ServerConfig
from .errors import APIError

# -- media --------------------------------------------------------------------------------------------


_VIDEO_KEYS = {"num_frames", "fps", "max_frames", "sampling", "start", "end"}
_PROCESSOR_KEYS = _VIDEO_KEYS | {"cut_enable"}


class UploadResolver(Protocol):
    """What `MediaSources` needs of the upload store (`owlvid.server.uploads.UploadStore`)."""

    def resolve(self, url: str, kind: str, param: str) -> NamedPath: ...

    def take_frames(self, key: str) -> Any: ...


UPLOAD_SCHEME = "owlvid-upload"  # owlvid-upload://ID names a file uploaded with POST /v1/uploads


class MediaSources:
    """Checks an `image_url` / `video_url` against the server's policy and returns what to hand to
    `owlvid.media`: the URL itself for `data:` and http(s) (media enforces the byte limit, the download
    deadline and `url_policy`), the resolved path of a local file under the allowed root, named in
    messages as the client wrote it (errors never show the server's folders or symlink targets), or the
    stored file of an upload (`owlvid-upload://ID`, where the server has an upload store)."""

    def __init__(self, config: ServerConfig, uploads: UploadResolver | None = None) -> None:
        self.config = config
        self.uploads = uploads
        root = config.allowed_local_media_path
        self.root = Path(root).expanduser().resolve() if root else None
        domains = config.allowed_media_domains
        self.url_policy = UrlPolicy(allow_private_hosts=config.allow_private_media_hosts,
                                    allowed_domains=tuple(domains) if domains is not None else None,
                                    connect_timeout=config.media_connect_timeout)

    @staticmethod
    def is_url(source: Any) -> bool:
        return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))

    def resolve(self, url: str, kind: str, param: str) -> str | NamedPath:
        url = url.strip()
        match = _SCHEME_RE.match(url)
        scheme = match.group(1).lower() if match else ""
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme in ("data", "http", "https"):
            return url
        if scheme in ("file", ""):
            return self._local_path(url, scheme, param)
        if scheme == UPLOAD_SCHEME and self.uploads is not None:
            return self.uploads.resolve(url, kind, param)
        raise APIError(400, f"unsupported {kind} URL scheme {scheme!r}: use http(s), data: or a local path",
                       param=param, code="invalid_media")

    def _local_path(self, url: str, scheme: str, param: str) -> str:
        if self.root is None:
            raise APIError(400, "local media paths are disabled on this server: send a data: or http(s) "
                           "URL, or start the server with --allowed-local-media-path", param=param,
                           code="local_media_disabled")
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise APIError(400, f"file URL with a remote host {parsed.netloc!r} is not supported",
                               param=param, code="invalid_media")
            raw = url2pathname(unquote(parsed.path))
        else:
            raw = url
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.root / path
        name = self._client_name(path, raw)
        try:
            real = path.resolve()  # symlinks and '..' resolved before the check
            inside = real == self.root or self.root in real.parents
            found = inside and real.is_file()
            size = real.stat().st_size if found else 0
        except (OSError, RuntimeError) as e:  # symlink loop, permission denied: the OS message names the path
            reason = getattr(e, "strerror", None) or "symlink loop"
            raise APIError(400, f"cannot access media file {name} ({reason})", param=param,
                           code="invalid_media") from None
        if not inside:
            raise APIError(400, f"{name} is outside the allowed local media path (--allowed-local-media-path)",
                           param=param, code="local_media_forbidden")
        if not found:
            raise APIError(400, f"media file not found: {name}", param=param, code="invalid_media")
        if size > self.config.max_media_bytes:
            limit = self.config.max_media_bytes
            raise MediaTooLargeError(f"{name}: {size} bytes is more than the limit of {limit} bytes "
                                     "(--max-media-bytes)")
        return NamedPath(real, name)

    def _client_name(self, path: Path, raw: str) -> str:
        """The path as the client wrote it, relative to the root where it lies there (lexically: a
        symlink's target is never shown), else just the file name."""
        assert self.root is not None
        try:
            return Path(os.path.normpath(path)).relative_to(self.root).as_posix() or "."
        except ValueError:
            return raw if not Path(raw).is_absolute() else Path(raw).name or "file"


_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


# -- request conversion --------------------------------------------------------------------------------


def _check_keys(options: Any, allowed: set[str], param: str) -> dict:
    if not isinstance(options, dict):  # the frame preview's body is not checked by the schema
        raise APIError(400, f"{param} must be an object", param=param, code="invalid_value")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise APIError(400, f"unsupported option(s) {', '.join(unknown)} in {param}; supported: "
                       f"{', '.join(sorted(allowed))}", param=param, code="unsupported_option")
    return dict(options)


def _checked(check: Any, *args: Any, param: str) -> None:
    """Run a shared request check (owlvid.api); its InputError becomes a 400 naming the field."""
    try:
        check(*args)
    except InputError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


# Top-level request fields that owlvid does not implement. Fields that cannot change an answer are accepted
# and ignored; the others are accepted only with their neutral value (what the field's absence means) and
# refused with a 400 naming the field otherwise; a field in neither list is refused unless null, so that no
# client silently gets another behaviour than the one it asked for.
_IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "request_id", "prompt_cache_key",
                   "safety_identifier", "parallel_tool_calls"}
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1, 1.0), "min_p": (0, 0.0),
    "stop_token_ids": ([],), "bad_words": ([],), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "echo": (False,),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "add_special_tokens": (False,),
    "return_tokens_as_token_ids": (False,), "priority": (0,), "modalities": (["text"],),
    "chat_template_kwargs": ({},), "audio": (), "prediction": (), "reasoning_effort": (),
    "web_search_options": (), "prompt_logprobs": (), "allowed_token_ids": (), "logits_processors": (),
    "truncate_prompt_tokens": (), "chat_template": (), "documents": (), "structured_outputs": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "guided_decoding_backend": (), "guided_whitespace_pattern": (), "vllm_xargs": (), "kv_transfer_params": (),
}


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # by type too: True == 1 in Python, but best_of=true is not best_of=1
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def _refuse_extra_fields(body: schemas.ChatCompletionRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED_FIELDS or value is None:  # null asks for nothing
            continue
        if name not in _NEUTRAL:
            raise APIError(400, f"unknown or unsupported option {name!r}: this server does not implement it "
                           "(see docs/serving.md, 'Request fields')", param=name, code="unsupported_option")
        neutral = _NEUTRAL[name]
        if not _is_neutral(value, neutral):
            only = f" (only {' or '.join(map(repr, neutral))} is accepted)" if neutral else ""
            raise APIError(400, f"{name} is not supported by this server{only}", param=name,
                           code="unsupported_option")


def _refuse_unsupported(body: schemas.ChatCompletionRequest) -> None:
    _refuse_extra_fields(body)
    if body.stream_options and (body.stream_options.model_extra or {}).get("continuous_usage_stats"):
        raise APIError(400, "stream_options.continuous_usage_stats is not supported by this server (usage comes "
                       "in the last chunk with include_usage)", param="stream_options.continuous_usage_stats",
                       code="unsupported_option")
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_option")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name,
                           code="unsupported_option")
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_option")
    for name in ("tools", "functions", "logit_bias"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_option")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_option")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_option")


class RequestBuilder:
    """Validated request -> (owlvid messages with decoded media, generation options)."""

    def __init__(self, model: Any, config: ServerConfig, uploads: UploadResolver | None = None) -> None:
        self.model = model
        self.config = config
        self.sources = MediaSources(config, uploads)

    def adapter_for(self, name: str | None) -> str | None:
        """The unmerged LoRA adapter (`--lora-modules`) a request's `model` names; None: the base model."""
        return name if name and name != self.config.served_model_name and name in self.adapter_names else None

    @property
    def adapter_names(self) -> list[str]:
        return self.model.adapter_names

    def check_model(self, name: str | None) -> str:
        """The model name a response reports: the base's or the adapter's; 404 (OpenAI's model_not_found)
        for a name that is neither."""
        if not name or name == self.config.served_model_name:
            return self.config.served_model_name
        if name in self.adapter_names:
            return name
        served = ", ".join(f"`{n}`" for n in [self.config.served_model_name, *self.adapter_names])
        raise APIError(404, f"The model `{name}` does not exist: this server serves {served}", param="model",
                       code="model_not_found")

    def adapter_cards(self, created: int) -> list[dict]:
        """/v1/models entries of the adapters (vLLM's form: `root` the adapter folder, `parent` the base)."""
        cards = []
        for adapter in self.model.runtime.adapters:
            card = schemas.model_card(adapter.name, str(adapter.path), self.model.runtime.max_positions, created)
            card["parent"] = self.config.served_model_name
            cards.append(card)
        return cards

    def options(self, body: schemas.ChatCompletionRequest) -> tuple[dict, dict]:
        """(generation kwargs, video options) of a request; cheap, runs first. A `model` naming an unmerged
        LoRA adapter selects it (`adapter`); any other name answers with the base model (batch files)."""
        cfg = self.config
        _refuse_unsupported(body)
        asked = body.max_completion_tokens or body.max_tokens
        gen: dict[str, Any] = {
            # an explicit max_tokens must fit the context (400 otherwise, as vLLM); the default just stops there
            "max_new_tokens": asked or cfg.default_max_tokens,
            "shorten_to_context": not asked,
            "temperature": cfg.default_temperature if body.temperature is None else body.temperature,
            "top_p": cfg.default_top_p if body.top_p is None else body.top_p,
            "top_k": max(body.top_k or 0, 0),
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
            "seed": cfg.default_seed if body.seed is None else body.seed,
            "min_tokens": body.min_tokens or 0,
            "ignore_eos": bool(body.ignore_eos),
        }
        if gen["min_tokens"] > gen["max_new_tokens"]:
            raise APIError(400, f"min_tokens ({gen['min_tokens']}) must be at most max_tokens "
                           f"({gen['max_new_tokens']})", param="min_tokens", code="invalid_value")
        if body.stop:
            gen["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        _checked(check_seed, gen["seed"], param="seed")
        for i, text in enumerate(gen.get("stop", [])):
            _checked(check_text, text, f"stop string {i}", param="stop")
        video, cut = self.video_options(body.media_io_kwargs, body.mm_processor_kwargs)
        if cut is not None:
            gen["cut_enable"] = cut
        adapter = self.adapter_for(body.model)
        if adapter is not None:
            gen["adapter"] = adapter
        return gen, video

    def video_options(self, media_io_kwargs: dict | None, mm_processor_kwargs: dict | None
                      ) -> tuple[dict, bool | None]:
        """(video options, cut_enable or None) of a request's `media_io_kwargs` / `mm_processor_kwargs`,
        checked against the server's limits (also used by the web page's frame preview)."""
        cfg = self.config
        io_kwargs = media_io_kwargs or {}
        _check_keys(io_kwargs, {"video", "image"}, "media_io_kwargs")
        _check_keys(io_kwargs.get("image") or {}, set(), "media_io_kwargs.image")
        requested = _check_keys(io_kwargs.get("video") or {}, _VIDEO_KEYS, "media_io_kwargs.video")
        proc = _check_keys(mm_processor_kwargs or {}, _PROCESSOR_KEYS, "mm_processor_kwargs")
        cut = proc.pop("cut_enable", cfg.cut_enable)
        requested.update(proc)
        # the server's defaults apply where the request says nothing: a frame count or rate in the request
        # replaces the server's (never both, which presets refuse as disagreeing)
        framing = {"num_frames", "max_frames", "fps"}
        video = {k: v for k, v in cfg.video_options.items() if not (k in framing and framing & set(requested))}
        video.update(requested)
        for key in ("num_frames", "max_frames"):
            value = video.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise APIError(400, f"{key} must be a positive integer", param=key, code="invalid_value")
            if value > cfg.max_frames:
                raise APIError(400, f"{key}={value} is over this server's limit of {cfg.max_frames} frames "
                               "per video (--max-frames)", param=key, code="too_many_frames")
        fps = video.get("fps")
        if fps is not None and (not isinstance(fps, int | float) or isinstance(fps, bool) or fps <= 0):
            raise APIError(400, "fps must be a positive number", param="fps", code="invalid_value")
        if cut is not None and not isinstance(cut, bool):
            raise APIError(400, "cut_enable must be true or false", param="cut_enable", code="invalid_value")
        return video, cut

    def messages(self, body: schemas.ChatCompletionRequest, video_options: dict) -> list[dict]:
        """Convert messages and fetch/decode their media (blocking: run in a thread)."""
        count = sum(1 for m in body.messages if isinstance(m.content, list)
                    for p in m.content if p.type != "text")
        if count > self.config.max_media_per_request:
            raise APIError(400, f"the request has {count} images/videos; this server accepts at most "
                           f"{self.config.max_media_per_request} (--max-media-per-request)", param="messages",
                           code="too_many_media")
        out = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if not isinstance(m.content, list):
                _checked(check_text, m.content or "", f"messages.{i}.content", param=f"messages.{i}.content")
                out.append({"role": role, "content": m.content or ""})
                continue
            parts = []
            for j, p in enumerate(m.content):
                param = f"messages.{i}.content.{j}"
                if p.type == "text":
                    _checked(check_text, p.text, param, param=param)
                    parts.append({"type": "text", "text": p.text})
                elif p.type == "image_url":
                    parts.append({"type": "image", "image": self._image(p.image_url.url, param)})
                else:
                    frames = self._video(p.video_url.url, video_options, param)
                    parts.append({"type": "video", "video": frames})
            out.append({"role": role, "content": parts})
        return out

    def _image(self, url: str, param: str):
        from ..media import load_image
        from ..messages import load_image_source

        cfg = self.config
        source = self.sources.resolve(url, "image", param)
        image = load_image_source(lambda: load_image(source, max_pixels=cfg.max_image_pixels,
                                                     max_bytes=cfg.max_media_bytes, timeout=cfg.download_timeout,
                                                     url_policy=self.sources.url_policy),
                                  cfg.media_timeout, name=source)
        return image

    def decode_options(self, source: Any, options: dict) -> dict:
        """The `load_video_frames` options of a video under the server's limits (the frame cap is applied by
        `owlvid.video_plan.plan_video`)."""
        cfg = self.config
        opts = dict(options)
        opts.update(max_bytes=cfg.max_media_bytes, timeout=cfg.download_timeout,
                    max_pixels=cfg.max_image_pixels)
        if self.sources.is_url(source):  # only then: other options would turn off streamed decoding
            opts["url_policy"] = self.sources.url_policy
        return opts

    def _video(self, url: str, options: dict, param: str) -> Any:
        """The video as the model's PreparedVideo: at most --max-frames frames, chosen before decoding.
        Frames the web page's preview already decoded for an upload are used instead of decoding again."""
        from ..video_plan import load_video_frames

        source = self.sources.resolve(url, "video", param)
        uploads = self.sources.uploads
        return load_video_frames(source, self.model.runtime, self.decode_options(source, options),
                                 frame_cap=self.config.max_frames, media_timeout=self.config.media_timeout,
                                 decoded=uploads.take_frames if uploads is not None else None)
