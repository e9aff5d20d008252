"""Generation: sampling and the prefill/decode loop shared by every model.

A model runtime provides `prefill(request) -> (logits, state)` and `decode(state, token_id) -> logits`
(float32 next-token logits); the loop here samples, stops and streams text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import InputError
from .tokenizer import IncrementalDecoder, QwenTokenizer


@dataclass
class SamplingParams:
    """Decoding settings. temperature 0 (the default) is greedy, as the official README path."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InputError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise InputError("repetition_penalty must be > 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class Runtime(Protocol):
    tokenizer: QwenTokenizer
    stop_token_ids: list[int]
    max_positions: int

    def prefill(self, request: Any) -> tuple[torch.Tensor, Any]: ...

    def decode(self, state: Any, token_id: int) -> torch.Tensor: ...


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.params
        logits = logits.float().cpu().clone()  # a normal tensor: edited in place below
        if p.repetition_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), dtype=torch.long)
            ids = ids[ids < logits.shape[-1]]
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new text this token completes (may be empty mid-character)


def run_generation(runtime: Runtime, request: Any, prompt_ids: list[int], params: SamplingParams
                   ) -> Iterator[TokenEvent | Generation]:
    """Yield a TokenEvent per generated token, then the final Generation."""
    params.validate()
    if len(prompt_ids) >= runtime.max_positions:
        raise InputError(f"the prompt has {len(prompt_ids)} tokens; this model has {runtime.max_positions} "
                         "positions")
    budget = min(params.max_new_tokens, runtime.max_positions - len(prompt_ids))
    sampler = Sampler(params)
    decoder = IncrementalDecoder(runtime.tokenizer)
    stops = set(runtime.stop_token_ids)
    t0 = time.perf_counter()
    logits, state = runtime.prefill(request)
    t1 = time.perf_counter()
    history = list(prompt_ids)
    generated: list[int] = []
    finish = "length"
    text = ""
    cut_by_stop_string = False
    while True:
        token = sampler(logits, history)
        if token in stops:
            finish = "stop"
            break
        generated.append(token)
        history.append(token)
        delta = decoder.push(token)
        if params.stop and delta:
            candidate = text + delta
            hit = min((candidate.find(s) for s in params.stop if s and s in candidate), default=-1)
            if hit >= 0:
                delta = candidate[len(text):hit] if hit > len(text) else ""
                if delta:
                    yield TokenEvent(token, delta)
                text = candidate[:hit]
                finish, cut_by_stop_string = "stop", True
                break
        text += delta
        yield TokenEvent(token, delta)
        if len(generated) >= budget:
            break
        logits = runtime.decode(state, token)
    if not cut_by_stop_string:
        tail = decoder.flush()
        if tail:
            text += tail
            yield TokenEvent(generated[-1] if generated else -1, tail)
    t2 = time.perf_counter()
    yield Generation(text=text, token_ids=generated, finish_reason=finish, prompt_tokens=len(prompt_ids),
                     completion_tokens=len(generated),
                     timings={"prefill_s": t1 - t0, "decode_s": t2 - t1,
                              "decode_tokens_per_s": max(len(generated) - 1, 0) / max(t2 - t1, 1e-9)})
