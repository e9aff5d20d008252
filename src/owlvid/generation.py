"""One request's generation bookkeeping: its result (`Generation`), its streamed events (`TokenEvent`) and
`RequestStream` (stop tokens and strings, incremental text, timings). The engine (`engine.py`) drives
them; this module holds no loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError
from .runtime import ModelRuntime
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDecoder


def check_context(prompt_tokens: int, max_positions: int, max_new_tokens: int | None = None) -> None:
    """The prompt must leave room for an answer; an explicit `max_new_tokens` must fit the model's context
    together with the prompt (vLLM's rule)."""
    if prompt_tokens >= max_positions:
        raise InputError(f"the prompt has {prompt_tokens} tokens; this model has {max_positions} positions")
    if max_new_tokens is not None and prompt_tokens + max_new_tokens > max_positions:
        raise InputError(f"this model's maximum context length is {max_positions} tokens; the request asks "
                         f"for {prompt_tokens + max_new_tokens} ({prompt_tokens} in the messages, "
                         f"{max_new_tokens} in the completion): reduce the messages or max_tokens")


@dataclass
class Generation:
    """One answer.

    `timings` (seconds unless said): `prefill_s` (the LLM prefill; vision encoding that ran inside it is
    counted in `vision_s` instead), `decode_s` and `decode_steps` (the decoding steps after the first token;
    batched steps count fully for every request in them), `decode_tokens_per_s`, `media_s` (loading and
    decoding this request's images/videos), `vision_s` (vision encoding; 0 for visual-cache hits) and, from
    `jobs.generate_each`, `prepare_s` (building the request: media, prompt; vision too when encoded ahead)
    and `queue_s` (prepared, waiting for a batch slot).

    `media`: one record per image/video, in prompt order, saying what the model saw (an audit):
    `{"type": "video" | "image", "source": description, "sha256": of the source's bytes, "decoder":
    backend, "frames": count, "indices": source frame numbers, "timestamps": their times in seconds,
    "crops": vision crops, "visual_cache": "hit" | "miss" | "off" | "reused", "decode_s", "encode_s"}`
    (images: `width`, `height`, and `hashed`: "bytes", or "pixels" for an image given as pixels). Fields a
    source cannot tell are None (frames given as a list have no indices). Empty for text-only requests
    and for runtimes without `media_audit`.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    media: list[dict] = field(default_factory=list)


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new text this token completes (may be empty mid-character)


class RequestStream:
    """One request's decoding bookkeeping: sampling, stop tokens and strings, text deltas, result."""

    def __init__(self, runtime: ModelRuntime, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        check_context(len(prompt_ids), runtime.max_positions)
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.budget = min(params.max_new_tokens, runtime.max_positions - len(prompt_ids))
        # Slow-Fast's official generate() penalises only generated tokens; Owl3 (HF) the whole sequence.
        self.sampler = Sampler(params, history=prompt_ids if runtime.penalize_prompt else ())
        self.decoder = IncrementalDecoder(runtime.tokenizer)
        self.stops = set(runtime.stop_token_ids)
        if params.ignore_eos:  # an end token is then an ordinary token (vLLM's benchmarking option)
            self.stops = set()
        elif params.min_tokens > 0:
            self.sampler.banned = sorted(self.stops)  # lifted by accept_token at min_tokens
        self.generated: list[int] = []
        self._parts: list[str] = []  # text emitted so far, in pieces joined on demand (see `text`)
        self._held = ""  # decoded text not yet emitted: it may be the start of a stop string
        self._stops = [s for s in params.stop if s]
        # A stop string can only begin in the held text (see `_emit`); the last max(len)-1 emitted characters
        # are kept too, so the scanned window is bounded by the stop strings, not by the text length.
        self._tail_len = max(map(len, self._stops), default=1) - 1
        self._tail = ""
        self.finish_reason: str | None = None
        self.timings: dict[str, float] = {}
        self.media: list[dict] = []  # the request's media audit (`Generation.media`), set once prefilled
        self.state: Any = None
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text emitted so far (the final text once done)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def accept(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample the next token from `logits` [vocab]; see `accept_token`."""
        return self.accept_token(self.sampler(logits))

    def accept_token(self, token: int) -> list[TokenEvent]:
        """The next token (sampled by `self.sampler`); returns the text it completes. Sets `done` when
        finished. When not done, the caller feeds `self.generated[-1]` to the model for the next logits."""
        early = len(self.generated) < self.params.min_tokens  # before min_tokens nothing ends the answer
        if token in self.stops and not early:
            self.finish_reason = "stop"
            return self._finish_text(self.generated[-1] if self.generated else -1)
        self.generated.append(token)
        self.sampler.observe(token)
        if self.sampler.banned and len(self.generated) >= self.params.min_tokens:
            self.sampler.banned = []
        events = self._emit(token, self.decoder.push(token), final=False)
        if not self.done and len(self.generated) >= self.budget:
            self.finish_reason = "length"
            events += self._finish_text(token)
        return events

    def _emit(self, token: int, delta: str, final: bool) -> list[TokenEvent]:
        """Add decoded text and return the part that is certain. Text that may be the start of a stop
        string is held back until it cannot be (or the generation ends), so the streamed deltas always
        join to exactly the final text, which ends before the first stop string."""
        # Only a bounded window is scanned: the held text, the delta and the emitted tail (where no stop
        # string can start, as it would have been held back, but kept to match any overlap exactly).
        tail = self._tail
        window = tail + self._held + delta
        stops = self._stops
        if stops and len(self.generated) >= self.params.min_tokens:  # none fires before min_tokens (vLLM)
            hits = [i for i in (window.find(s) for s in stops) if i >= 0]
            if hits:
                final, window = True, window[: min(hits)]
                self.finish_reason = "stop"
        keep = 0 if final else _stop_prefix_length(window, stops, len(tail))
        out = window[len(tail): len(window) - keep]
        self._held = window[len(window) - keep:]
        if out:
            self._parts.append(out)
            self._tail = (tail + out)[-self._tail_len:] if self._tail_len else ""
        return [TokenEvent(token, out)]

    def _finish_text(self, token: int) -> list[TokenEvent]:
        """At the end: the decoder's incomplete tail and the held-back text."""
        return [e for e in self._emit(token, self.decoder.flush(), final=True) if e.text]

    def result(self) -> Generation:
        timings = dict(self.timings)
        timings["media_s"] = sum(m.get("decode_s") or 0.0 for m in self.media)
        timings["vision_s"] = sum(m.get("encode_s") or 0.0 for m in self.media)
        return Generation(text=self.text, token_ids=list(self.generated), finish_reason=self.finish_reason or "length",
                          prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated),
                          timings=timings, media=[dict(m) for m in self.media])

    def prefilled(self, runtime: ModelRuntime, request: Any, seconds: float, vision_before: float) -> None:
        """Book a prefill call of `seconds`: the vision encoding that ran inside it goes to `vision_s`, not
        `prefill_s`; the media audit is taken now that the media are encoded."""
        self.media = runtime.media_audit(request)
        inside = sum(m.get("encode_s") or 0.0 for m in self.media) - vision_before
        self.timings["prefill_s"] = self.timings.get("prefill_s", 0.0) + max(seconds - inside, 0.0)


def vision_seconds(runtime: ModelRuntime, request: Any) -> float:
    """Vision encoding spent on a request so far (see `ModelRuntime.media_audit`)."""
    return sum(m.get("encode_s") or 0.0 for m in runtime.media_audit(request))


def _stop_prefix_length(text: str, stops: list[str], start: int) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of one of `stops`."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
