"""The protocol interface the runner uses (h-evalproto's protocols/scoring; a stand-in until they land)."""

from __future__ import annotations

try:
    from .protocols import (
        BENCHMARKS,
        MLVU_DEV_TASK_TYPES,
        MVBENCH_FRAME_FPS,
        MVBENCH_TASKS,
        PROTOCOLS,
        VIDEO,
        Protocol,
        get_protocol,
        unletter_option,
    )
    from .scoring import Score, score_response
except ImportError:  # TEMPORARY: removed when protocols.py lands on main
    from ._standin_protocols import (  # noqa: F401
        BENCHMARKS,
        MLVU_DEV_TASK_TYPES,
        MVBENCH_FRAME_FPS,
        MVBENCH_TASKS,
        PROTOCOLS,
        VIDEO,
        Protocol,
        Score,
        get_protocol,
        score_response,
        unletter_option,
    )

__all__ = ["BENCHMARKS", "MLVU_DEV_TASK_TYPES", "MVBENCH_FRAME_FPS", "MVBENCH_TASKS", "PROTOCOLS", "VIDEO",
           "Protocol", "Score", "get_protocol", "score_response", "unletter_option"]
