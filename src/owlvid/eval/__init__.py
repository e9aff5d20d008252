"""Video-benchmark evaluation under the published protocols (docs/evaluation.md, README "Evaluation").

    owlvid.eval.run("mvbench", "/data/MVBench", owlvid.load("mPLUG/mPLUG-Owl3-7B-241101"), "runs/mvbench")
    owlvid.eval.score_response(benchmark="mvbench", protocol="official", response="B.", options=[...], answer="B")
"""

from .compare import compare_table
from .datasets import Question, load_questions
from .protocols import BENCHMARKS, PROTOCOLS, Protocol, get_protocol
from .results import format_table
from .runner import run
from .scoring import Score, score_response

__all__ = ["BENCHMARKS", "PROTOCOLS", "Protocol", "Question", "Score", "compare_table", "format_table",
           "get_protocol", "load_questions", "run", "score_response"]
