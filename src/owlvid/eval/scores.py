"""`score_response`: the one scoring entry point for every benchmark, the video tables (`scoring.py`) and the
image tables (`image_scoring.py`); its keywords are a stable interface (outside checks call it)."""

from __future__ import annotations

import random

from ..errors import InputError
from .image_scoring import IMAGE_BENCHMARKS, score_image_response
from .scoring import BENCHMARKS, Score, score_video_response


def score_response(*, benchmark: str, protocol: str, response: str, options: list[str] | None = None,
                   answer: str | None = None, answers: list[str] | None = None,
                   rng: random.Random | None = None) -> Score:
    """Score one model answer as ``protocol`` scores ``benchmark`` questions (see `score_video_response` and
    `image_scoring.score_image_response` for what each kind of benchmark takes and returns)."""
    if benchmark in IMAGE_BENCHMARKS:
        return score_image_response(benchmark=benchmark, protocol=protocol, response=response, options=options,
                                    answer=answer, answers=answers, rng=rng)
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS + IMAGE_BENCHMARKS)}")
    return score_video_response(benchmark=benchmark, protocol=protocol, response=response, options=options,
                                answer=answer, answers=answers, rng=rng)
