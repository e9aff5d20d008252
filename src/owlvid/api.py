"""The public Python API: `owlvid.load()` and `Model.chat / stream / generate / next_token_logits`.

Messages are OpenAI/Hugging Face style: `{"role": ..., "content": str | [parts]}` with parts
`{"type": "text", "text": ...}`, `{"type": "image", "image": path|URL|PIL|array}`,
`{"type": "video", "video": path|URL|[frames], "max_frames"?, "fps"?, "sampling"?}` (and the OpenAI
`image_url` / `video_url` forms). A string content may also carry the model's own placeholders
(`<|image|>`, `<|video|>`) with `images=` / `videos=` lists, exactly like the official processor.
Messages are normalised and their media loaded by `owlvid.messages`; videos follow `owlvid.video_plan`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .adapters import check_lora_modules, read_adapter
from .cache import VisualCache
from .checkpoint import checkpoint_shapes, read_config, resolve_checkpoint, resolve_device, resolve_dtype
from .engine import Generation, SamplingParams, Ticket, TokenEvent, check_context, run_batch, run_generation
from .errors import InputError
from .messages import check_seed, check_text, normalize_messages
from .models import runtime_class
from .quantize import check_supported, language_model_bytes, quantize_language_model
from .runtime import ModelRuntime
from .stages import split_model
from .tokenizer import QwenTokenizer

DEFAULT_MODEL = "mPLUG/mPLUG-Owl3-2B-241014"


def load(model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "auto", dtype: str | torch.dtype = "auto",
         tokenizer: str | os.PathLike | None = None, revision: str | None = None,
         cache_bytes: int = 2 << 30, cache_dir: str | os.PathLike | None = None,
         quantize: str | None = None, adapter: str | os.PathLike | None = None,
         lora_modules: dict[str, str | os.PathLike] | None = None, device_map: str | dict | None = None,
         max_memory: str | dict | None = None) -> Model:
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
    `device_map="auto" | "balanced" | {module prefix: device}` splits the model across devices as `owlvid plan`
    places it (owlvid.stages), within `max_memory` ({device: size} or "cuda:0=14GiB,cpu=64GiB"; default: every
    GPU less 1 GiB, and the available RAM as cpu). A dict's prefixes name the plan's module groups: "vision"
    (tower + projector), "llm.embed_tokens", "llm.layers.N", "lm_head" (final norm + LM head), "" for the rest;
    the longest matching prefix wins. Decoder layers are never cut: each one, with its caches, is on one device.
    """
    folder = resolve_checkpoint(model, revision=revision)
    raw = read_config(folder)
    runtime_cls = runtime_class(raw.get("model_type", ""))
    stages = None
    if device_map is None:
        if max_memory is not None:
            raise InputError("max_memory needs device_map (auto, balanced or a {module prefix: device} dict)")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        devices = [dev]
    else:
        if str(device) != "auto":
            raise InputError(f"give device ({device!r}) or device_map, not both")
        stages, dt = split_model(raw, checkpoint_shapes(folder), device_map, max_memory, dtype=dtype,
                                 quantize=quantize, cache_bytes=cache_bytes if runtime_cls.uses_visual_cache else 0)
        dev, devices = stages.embed_device, stages.devices
    if quantize is not None:
        for d in devices:
            check_supported(quantize, d, dt)
    check_lora_modules(lora_modules)
    tok = QwenTokenizer.from_dir(Path(tokenizer) if tokenizer else folder)
    # a merged adapter changes the weights, so it is merged before quantizing (then not as the weights are read)
    runtime = runtime_cls.load(folder, raw, tok, dev, dt, quantize=quantize if adapter is None else None,
                               stages=stages)
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
        stages = self.runtime.model.llm.stages
        if stages is not None:  # split across devices: where each part runs
            info["device_map"] = stages.describe()
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

    def ticket(self, messages: list[dict], options: dict, *, key: Any = None, encode_ahead: bool = False,
               media_timeout: float | None = None, timed: bool = False) -> Ticket:
        """A request ready for the engine: options split (generation vs media), messages rendered and their
        media loaded; with `encode_ahead`, the vision tower run too (on the caller's thread, beside the
        engine's steps). `timed`: its result reports the preparation and the wait for a batch slot
        (`prepare_s`, `queue_s`: front doors that prepare beside the engine). A mistake in the request is
        raised here."""
        t0 = time.perf_counter()
        options = dict(options)
        if media_timeout is not None:
            options.setdefault("media_timeout", media_timeout)
        prep, params = split_options(options)
        params.validate()
        request, prompt_ids = self.prepare(messages, **prep)
        if encode_ahead:
            request = self.runtime.encode_media(request)
        now = time.perf_counter()
        return Ticket(key=key, request=request, prompt_ids=prompt_ids, params=params, prepare_s=now - t0,
                      ready_at=now, timed=timed)

    def iter_generate(self, messages: list[dict], **kwargs: Any) -> Iterator[TokenEvent | Generation]:
        """TokenEvents as tokens are generated, then the final Generation."""
        ticket = self.ticket(messages, kwargs)
        yield from run_generation(self.runtime, ticket.request, ticket.prompt_ids, ticket.params)

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
                       adapters: list[str | None] | None = None, *, return_exceptions: bool = False,
                       **kwargs: Any) -> list[Generation]:
        """Answer several conversations together (decoded as one batch); results in input order.
        Each result is token for token what `generate` gives for that conversation alone. `adapters`: per
        conversation, the unmerged LoRA adapter that answers it (None: the base model); rows on different
        adapters decode in the same batch. A request that fails in the engine fails alone: its error is raised
        once the others have finished, or with `return_exceptions=True` it takes that request's place in the
        results. A mistake in a conversation's input is raised before anything runs."""
        if adapters is not None and len(adapters) != len(conversations):
            raise InputError(f"adapters has {len(adapters)} entries for {len(conversations)} conversations")
        per_row = adapters if adapters is not None else [kwargs.get("adapter")] * len(conversations)
        tickets = [self.ticket(messages, {**kwargs, "adapter": name}) for messages, name in zip(conversations, per_row)]
        return run_batch(self.runtime, tickets, max_batch=max_batch, errors="return" if return_exceptions else "raise")

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
