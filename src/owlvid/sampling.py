"""Choosing the next token: the sampling settings of a request and the batched sampler.

`sample(logits, samplers)` picks one token per row of a decoding batch's logits [B, vocab] with tensor
ops on the device that computed them: repetition penalty, temperature, top-k, top-p and the draw. Only
the B chosen ids cross to the host, once per step (the full-vocabulary rows never do). Each request keeps
its own settings and, when seeded, its own random generator, and a row's result depends only on its own
logits and generator: a request samples the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .errors import InputError


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


class Sampler:
    """One request's sampling state: its settings, its random generator (seeded requests) and, with a
    repetition penalty, the set of token ids seen so far as a bool mask on the device."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()) -> None:
        self.params = params
        self.seed = params.seed
        self.generator: torch.Generator | None = None  # made on the logits' device at the first draw
        self.penalized = params.repetition_penalty != 1.0
        self._pending = list(history) if self.penalized else []  # ids not yet in `_seen`
        self._seen: torch.Tensor | None = None

    def observe(self, token_id: int) -> None:
        """A token joined the sequence (it is penalised from the next step on)."""
        if self.penalized:
            self._pending.append(token_id)

    def seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Bool [vocab]: the ids the repetition penalty applies to (ids past the vocabulary are ignored)."""
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if self._pending:
            ids = torch.tensor([i for i in self._pending if 0 <= i < vocab], dtype=torch.long)
            self._seen[ids.to(device, non_blocking=True)] = True
            self._pending.clear()
        return self._seen

    def rng(self, device: torch.device) -> torch.Generator | None:
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits [vocab]."""
        return int(sample(logits[None], [self])[0])


def sample(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """One token per row of `logits` [B, vocab], row b sampled with `samplers[b]`: a [B] long tensor on
    the logits' device (the caller reads it back once per step)."""
    x = logits.float()
    device, (batch, vocab) = x.device, x.shape
    penalized = [b for b, s in enumerate(samplers) if s.penalized]
    if penalized:
        x = x.clone()  # edited in place below; the caller's logits stay as they were
        # Like the official generate(): a seen token's logit is divided by the penalty if positive,
        # multiplied if negative.
        rows = torch.tensor(penalized, device=device)
        seen = torch.stack([samplers[b].seen(vocab, device) for b in penalized])
        penalty = torch.tensor([samplers[b].params.repetition_penalty for b in penalized], device=device)[:, None]
        part = x[rows]
        x[rows] = torch.where(seen, torch.where(part > 0, part / penalty, part * penalty), part)
    sampled = [b for b, s in enumerate(samplers) if s.params.temperature > 0]
    if not sampled:
        return x.argmax(-1)
    out = x.argmax(-1) if len(sampled) < batch else torch.empty(batch, dtype=torch.long, device=device)
    for b in sampled:  # per row: top-k / top-p widths and the random stream are the row's own
        out[b] = _draw(x[b], samplers[b], device)
    return out


def _draw(row: torch.Tensor, sampler: Sampler, device: torch.device) -> torch.Tensor:
    """Sample one id from a row of (penalised) logits: temperature, top-k, top-p, then a multinomial draw.
    With top-k the draw runs over the k candidates only (a sort of k values instead of the vocabulary)."""
    p = sampler.params
    row = row / p.temperature
    if p.top_k > 0:
        values, ids = torch.topk(row, min(p.top_k, row.shape[-1]))  # descending
    else:
        values, ids = torch.sort(row, descending=True) if p.top_p < 1.0 else (row, None)
    if p.top_p < 1.0:
        probs = values.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set whose mass reaches top_p
        values = values.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(values.softmax(-1), 1, generator=sampler.rng(device))
    return choice[0] if ids is None else ids[choice[0]]
