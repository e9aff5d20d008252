"""The public Python API: `owlvid.load()` and `Model.chat / stream / generate / next_token_logits`.

Messages are OpenAI/Hugging Face style: `{"role": ..., "content": str | [parts]}` with parts
`{"type": "text", "text": ...}`, `{"type": "image", "image": path|URL|PIL|array}`,
`{"type": "video", "video": path|URL|[frames], "max_frames"?, "fps"?, "sampling"?}` (and the OpenAI
`image_url` / `video_url` forms). A string content may also carry the model's own placeholders
(`<|image|>`, `<|video|>`) with `images=` / `videos=` lists, exactly like the official processor.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .adapters import check_lora_modules, read_adapter
from .cache import FrameList, PreparedVideo, VisualCache, content_key, file_identity
from .checkpoint import read_config, resolve_checkpoint, resolve_device, resolve_dtype
from .engine import Generation, SamplingParams, TokenEvent, check_context, run_batch, run_generation
from .errors import CheckpointError, InputError
from .quantize import check_supported, language_model_bytes, quantize_language_model
from .runtime import ModelRuntime
from .tokenizer import QwenTokenizer

DEFAULT_MODEL = "mPLUG/mPLUG-Owl3-2B-241014"


def _runtime_class(model_type: str):
    if model_type == "mplugowl3":
        from .models.owl3 import Owl3Runtime

        return Owl3Runtime
    if model_type == "llava_qwen_slow_fast":
        from .models.slowfast import SlowFastRuntime

        return SlowFastRuntime
    raise CheckpointError(f"unsupported checkpoint: config.json model_type {model_type!r} (owlvid supports "
                          "mplugowl3 and llava_qwen_slow_fast)")


def load(model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "auto", dtype: str | torch.dtype = "auto",
         tokenizer: str | os.PathLike | None = None, revision: str | None = None,
         cache_bytes: int = 2 << 30, cache_dir: str | os.PathLike | None = None,
         quantize: str | None = None, adapter: str | os.PathLike | None = None,
         lora_modules: dict[str, str | os.PathLike] | None = None) -> Model:
    """Load a checkpoint from a local folder (no network) or a hub id (downloaded once into the HF cache).

    The architecture and variant come from config.json and the checkpoint keys, never from the name.
    `tokenizer` points to a folder with tokenizer files when the checkpoint folder has none.
    Image/video features are cached in memory (`cache_bytes`, 0 disables) and, with `cache_dir`, on disk,
    so a second question about the same media skips decoding and vision encoding.
    `quantize="int8" | "int4"` stores the language model's weights in int8 / group-wise int4 (torchao, the
    `quant` extra; see owlvid.quantize); a mode this machine cannot run is refused before loading.
    `adapter`: a LoRA adapter folder (PEFT / ms-swift: adapter_config.json + adapter_model.safetensors) merged
    into the weights (no cost per token). `lora_modules`: {name: folder} of adapters kept unmerged, chosen
    per request with `adapter="name"` (the base GEMMs shared by all rows of a batch, each row adding its own
    low-rank delta). See docs/finetunes.md.
    """
    folder = resolve_checkpoint(model, revision=revision)
    raw = read_config(folder)
    runtime_cls = _runtime_class(raw.get("model_type", ""))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if quantize is not None:
        check_supported(quantize, dev, dt)
    check_lora_modules(lora_modules)
    tok = QwenTokenizer.from_dir(Path(tokenizer) if tokenizer else folder)
    runtime = runtime_cls.load(folder, raw, tok, dev, dt)
    if adapter is not None:
        from .lora import merge_adapter

        merged = read_adapter(adapter, runtime.model, runtime.weight_key_map())
        merge_adapter(runtime.model, merged)
        runtime.merged_adapter = merged
        runtime.weights_changed(f"lora:{merged.sha256}")
    if quantize is not None:
        runtime.quantization = quantize_language_model(runtime.model, quantize)
    if lora_modules:
        from .lora import install_adapters

        key_map = runtime.weight_key_map()
        runtime.adapters = [read_adapter(path, runtime.model, key_map, name) for name, path in lora_modules.items()]
        runtime.lora_layout = install_adapters(runtime.model, runtime.adapters)
    if cache_bytes > 0 and runtime.uses_visual_cache:
        runtime.visual_cache = VisualCache(cache_bytes, cache_dir)
    return Model(runtime, name=str(model))


class Model:
    """A loaded model. Thread-compatible (not thread-safe): serve concurrent callers through one queue."""

    def __init__(self, runtime: ModelRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    # -- properties --------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> QwenTokenizer:
        return self.runtime.tokenizer

    @property
    def processor(self):
        """The official-style processor: `processor(messages, images=[...], videos=[[...]], cut_enable=...)`."""
        return self.runtime.processor

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runtime.dtype

    @property
    def architecture(self) -> str:
        return self.runtime.architecture

    def describe(self) -> dict:
        info = {"name": self.name, "folder": str(self.runtime.folder), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", "")}
        info.update(self.runtime.describe())
        report = self.runtime.quantization
        info["quantize"] = None if report is None else report.mode
        info["language_model_bytes"] = language_model_bytes(self.runtime.model)
        info["parameters"] = sum(p.numel() for p in self.runtime.model.parameters())
        merged = self.runtime.merged_adapter
        info["adapter"] = None if merged is None else merged.describe()
        info["lora_modules"] = [a.describe() for a in self.runtime.adapters]
        return info

    @property
    def adapter_names(self) -> list[str]:
        """The unmerged adapters a request may name (`adapter="name"`), in load order."""
        return [a.name for a in self.runtime.adapters]

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], *, images: list | None = None, videos: list | None = None,
                cut_enable: bool | None = None, max_frames: int | None = None, fps: float | None = None,
                sampling: str | None = None, max_new_tokens: int | None = None,
                media_timeout: float | None = None, adapter: str | None = None) -> tuple[Any, list[int]]:
        """Render and tokenize a conversation with its media; returns (model inputs, prompt ids).
        A prompt that fills the context, or with `max_new_tokens` leaves less room than that, is refused.
        `media_timeout`: seconds each image or video may take to load and decode (MediaTimeout after).
        `adapter`: the name of an unmerged LoRA adapter (`lora_modules`) that answers it (None: the base)."""
        slot = self.runtime.adapter_slot(adapter)  # an unknown name fails before any media is loaded
        video_opts = {k: v for k, v in (("max_frames", max_frames), ("fps", fps), ("sampling", sampling))
                      if v is not None}
        msgs, imgs, vids = normalize_messages(messages, self.runtime, images, videos, video_opts, media_timeout)
        request, prompt_ids = self.runtime.prepare(msgs, imgs, vids, cut_enable)
        if slot:
            request["adapter"] = slot
        check_context(len(prompt_ids), self.runtime.max_positions, max_new_tokens)
        return request, prompt_ids

    def iter_generate(self, messages: list[dict], **kwargs: Any) -> Iterator[TokenEvent | Generation]:
        """TokenEvents as tokens are generated, then the final Generation (used by the server)."""
        prep, sampling = split_options(kwargs)
        request, prompt_ids = self.prepare(messages, **prep)
        yield from run_generation(self.runtime, request, prompt_ids, sampling)

    def generate(self, messages: list[dict], **kwargs: Any) -> Generation:
        """Answer the conversation: `Generation(text, token_ids, finish_reason, prompt_tokens, ...)`."""
        result = None
        for event in self.iter_generate(messages, **kwargs):
            result = event
        assert isinstance(result, Generation)
        return result

    def chat(self, messages: list[dict], **kwargs: Any) -> str:
        return self.generate(messages, **kwargs).text

    def stream(self, messages: list[dict], **kwargs: Any) -> Iterator[str]:
        """Text deltas as they are generated (never splitting a UTF-8 character)."""
        for event in self.iter_generate(messages, **kwargs):
            if isinstance(event, TokenEvent) and event.text:
                yield event.text

    def generate_batch(self, conversations: list[list[dict]], max_batch: int = 8,
                       adapters: list[str | None] | None = None, **kwargs: Any) -> list[Generation]:
        """Answer several conversations together (decoded as one batch); results in input order.
        Each result is token for token what `generate` gives for that conversation alone. `adapters`: per
        conversation, the unmerged LoRA adapter that answers it (None: the base model); rows on different
        adapters decode in the same batch. A model without batched decoding (`supports_batching` off) answers
        them one after another."""
        prep, sampling = split_options(kwargs)
        if adapters is not None and len(adapters) != len(conversations):
            raise InputError(f"adapters has {len(adapters)} entries for {len(conversations)} conversations")
        per_row = adapters if adapters is not None else [prep.pop("adapter", None)] * len(conversations)
        prep.pop("adapter", None)
        if not self.runtime.supports_batching:  # no batched decoding for this model: one by one
            return [self.generate(messages, adapter=name, **{**vars(sampling), **prep})
                    for messages, name in zip(conversations, per_row)]
        items = []
        for messages, name in zip(conversations, per_row):
            request, prompt_ids = self.prepare(messages, adapter=name, **prep)
            items.append((request, prompt_ids, SamplingParams(**vars(sampling))))
        return run_batch(self.runtime, items, max_batch=max_batch)

    def next_token_logits(self, messages: list[dict], **kwargs: Any) -> torch.Tensor:
        """float32 logits [vocab] of the token after the prompt (scoring, multiple-choice evaluation)."""
        prep, _ = split_options(kwargs)
        request, _ = self.prepare(messages, **prep)
        logits, _ = self.runtime.prefill(request)
        return logits.float().cpu()


_PREPARE_KEYS = {"images", "videos", "cut_enable", "max_frames", "fps", "sampling", "media_timeout", "adapter"}


def split_options(kwargs: dict) -> tuple[dict, SamplingParams]:
    """(prepare kwargs, SamplingParams) of a call. A `max_new_tokens` the caller gives is also checked
    against the context left by the prompt, unless `shorten_to_context=True` (a server default: the
    answer just stops where the context ends)."""
    prep = {k: kwargs.pop(k) for k in list(kwargs) if k in _PREPARE_KEYS}
    if "max_new_tokens" in kwargs and not kwargs.pop("shorten_to_context", False):
        prep["max_new_tokens"] = kwargs["max_new_tokens"]
    kwargs.pop("shorten_to_context", None)
    if kwargs.get("stop") is None:
        kwargs.pop("stop", None)
    check_seed(kwargs.get("seed"))
    stop = kwargs.get("stop")
    for i, text in enumerate([stop] if isinstance(stop, str) else stop or []):
        check_text(text, f"stop string {i}")
    try:
        sampling = SamplingParams(**kwargs)
    except TypeError as e:
        raise InputError(f"unknown option: {e}") from None
    return prep, sampling


# -- request checks shared by the Python API and the server --------------------------------------------

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


def check_seed(seed: Any) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {type(seed).__name__}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise InputError(f"seed {seed} is out of range: it must be between -2**63 and 2**64-1")


def check_text(text: Any, where: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (e.g. JSON "\\ud800") is refused."""
    if not isinstance(text, str):
        raise InputError(f"{where} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                         f"character {e.start}") from None


def _part_source(part: dict, kind: str) -> Any:
    value = part.get(kind)
    if value is None and f"{kind}_url" in part:  # OpenAI style {"type": "image_url", "image_url": {"url": ...}}
        value = part[f"{kind}_url"]
        value = value.get("url") if isinstance(value, dict) else value
    if value is None:
        raise InputError(f"content part of type {part.get('type')!r} has no {kind!r} field")
    return value


_SPEC_KEYS = ("sampling", "max_frames", "num_frames", "fps", "min_frames", "start", "end")


def _sampling_spec(opts: dict, frame_cap: int | None) -> Any:
    """The media layer's VideoSampling for `opts`; with a cap, at most `frame_cap` of the frames it selects
    are kept (evenly), before anything is decoded."""
    from .media import VideoSampling

    sampling = opts.get("sampling")
    if isinstance(sampling, VideoSampling):
        return sampling if frame_cap is None else dataclasses.replace(sampling, frame_cap=frame_cap)
    if not isinstance(sampling, str):
        raise InputError(f"sampling must be a preset name, got {sampling!r}")
    spec = {k: opts[k] for k in _SPEC_KEYS[1:] if k in opts}
    return VideoSampling(preset=sampling, **spec, frame_cap=frame_cap)


def video_plan(source: Any, runtime: ModelRuntime, options: dict, *, frame_cap: int | None = None
               ) -> tuple[str | None, Any, dict]:
    """How `load_video_frames` reads a video: (its visual-cache key, None unless `source` is a local file;
    the media layer's VideoSampling; the other `load_video` options). The server's frame preview decodes
    with the same plan, so it shows the frames the model gets."""
    opts = runtime.video_options(options)
    key = None
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(("http:", "https:", "data:")):
        try:
            capped = () if frame_cap is None else (("frame_cap", frame_cap),)
            key = content_key("video-file", file_identity(source), sorted(opts.items()), *capped)
        except OSError:
            key = None  # missing file: load_video reports it
    return key, _sampling_spec(opts, frame_cap), {k: v for k, v in opts.items() if k not in _SPEC_KEYS}


def load_video_frames(source: Any, runtime: ModelRuntime, options: dict, *, frame_cap: int | None = None,
                      media_timeout: float | None = None,
                      decoded: Callable[[str], PreparedVideo | None] | None = None) -> PreparedVideo | list:
    """A list of frames is used as is; anything else is decoded with the model's sampling preset. A local
    file already encoded with the same settings is not decoded again (the runtime's visual cache), nor one
    whose frames `decoded(key)` holds (e.g. decoded by the server's frame preview).
    `frame_cap`: at most this many frames (evenly spread over those the preset picks), chosen before
    decoding. `media_timeout`: seconds the fetching and decoding may take (MediaTimeout after that, for
    frames decoded later while encoding too). The result records what was decoded, how and how long
    (`PreparedVideo.describe()`)."""
    if isinstance(source, PreparedVideo):
        return source  # already prepared (e.g. `owlvid chat` keeps a video across turns)
    if isinstance(source, (list, tuple)):
        return list(source)
    from .media import load_video
    from .media.sources import describe_source, file_sha256
    from .pipeline import call_with_timeout

    name = describe_source(source)
    key, spec, rest = video_plan(source, runtime, options, frame_cap=frame_cap)
    if key is not None:
        cached = runtime.cached_video(key)
        if cached is None and decoded is not None:
            cached = decoded(key)
        if cached is not None:
            cached.source_name = name
            return cached

    def load() -> PreparedVideo:
        streamed = plan_streamed_video(source, spec, rest, key, media_timeout) \
            if runtime.supports_streamed_video else None
        if streamed is not None:
            streamed.sha256 = file_sha256(source)
            return streamed
        clip = load_video(source, sampling=spec, **rest)
        video = FrameList(clip.frames, key, clip.indices, clip.timestamps)
        video.sha256, video.decoder = clip.sha256, clip.backend
        return video

    t0 = time.perf_counter()
    video = call_with_timeout(load, media_timeout, name)
    video.source_name = name
    video.decode_s = time.perf_counter() - t0  # a streamed video adds its decoding while it is encoded
    return video


def load_image_source(source: Any, media_timeout: float | None = None, *, name: Any = None) -> Any:
    """An image given as a path, URL, data: URL, bytes or file-like, loaded now (under `media_timeout`),
    with where it came from and how long it took in its `info` (see `cache.image_record`). Anything else
    (PIL images, arrays) is returned as it is, for the processor. `source` may also be a function that
    loads the image (with the caller's limits); `name` then says what it loads."""
    from .cache import IMAGE_DECODE_S, IMAGE_SOURCE
    from .media import load_image
    from .media.sources import describe_source, is_bytes_source

    if callable(source) and not is_bytes_source(source):
        load = source
    elif is_bytes_source(source):
        name = source
        load = lambda: load_image(source)  # noqa: E731
    else:
        return source
    from .pipeline import call_with_timeout

    name = describe_source(name)
    t0 = time.perf_counter()
    image = call_with_timeout(load, media_timeout, name)
    image.info[IMAGE_SOURCE] = name
    image.info[IMAGE_DECODE_S] = time.perf_counter() - t0
    return image


def plan_streamed_video(source: Any, spec: Any, options: dict, key: str | None,
                        media_timeout: float | None = None) -> Any:
    """For a local video file with a plain preset, pick the frame indices now (container metadata only)
    and decode the frames later, chunk by chunk, while the vision tower encodes (see owlvid.pipeline).
    Returns None where the eager path must be used (URLs, time windows, variable frame rate)."""
    from .media import probe_video
    from .pipeline import StreamedVideo

    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source) or key is None:
        return None
    if set(options) - {"backend", "skip_bad_frames", "max_bytes"}:
        return None  # decoder options the streamed path does not take: let load_video decide
    if any(getattr(spec, k) is not None for k in ("start", "end", "indices", "timestamps")):
        return None  # time windows, explicit indices or timestamps: let load_video decide
    info = probe_video(source, backend=options.get("backend", "pyav"))
    if info["variable_frame_rate"]:
        return None
    indices = spec.select(info["total_frames"], info["fps"], None, info["duration"], cap=None)
    return StreamedVideo(source, indices, dict(options), key, media_timeout=media_timeout)


def normalize_messages(messages: list[dict], runtime: ModelRuntime, images: list | None, videos: list | None,
                       video_options: dict, media_timeout: float | None = None) -> tuple[list[dict], list, list]:
    """Structured content parts -> string content with the model's placeholders + media lists in
    text order. A media part followed by text renders as `<placeholder>\\n{text}` like the official
    README prompt. Media are loaded here, each within `media_timeout` seconds when given."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out_images = [load_image_source(i, media_timeout) for i in images or []]
    out_videos = [load_video_frames(v, runtime, video_options, media_timeout=media_timeout) for v in (videos or [])]
    structured = any(isinstance(m.get("content"), list) for m in messages if isinstance(m, dict))
    if structured and (images or videos):
        raise InputError("pass media either as content parts or as images=/videos=, not both")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        content = m.get("content")
        if content is None or isinstance(content, str):
            check_text(content or "", f"message {i} content")
            out.append({"role": m["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i} content must be a string or a list of parts")
        text = ""
        prev_media = False
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                part_text = part.get("text", "")
                part_text = part_text if isinstance(part_text, str) else str(part_text)
                check_text(part_text, f"message {i} text part")
                text += ("\n" if prev_media else "") + part_text
                prev_media = False
            elif kind in ("image", "image_url"):
                out_images.append(load_image_source(_part_source(part, "image"), media_timeout))
                text += runtime.image_placeholder
                prev_media = True
            elif kind in ("video", "video_url"):
                opts = dict(video_options)
                opts.update({k: part[k] for k in ("max_frames", "fps", "sampling", "num_frames", "start", "end")
                             if k in part})
                out_videos.append(load_video_frames(_part_source(part, "video"), runtime, opts,
                                                    media_timeout=media_timeout))
                text += runtime.video_placeholder
                prev_media = True
            else:
                raise InputError(f"message {i} has a content part of unknown type {kind!r}")
        out.append({"role": m["role"], "content": text})
    return out, out_images, out_videos
