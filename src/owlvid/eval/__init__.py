"""Video-benchmark evaluation under the published protocols (docs/evaluation.md, README "Evaluation").

    owlvid.eval.run("mvbench", "/data/MVBench", owlvid.load("mPLUG/mPLUG-Owl3-7B-241101"), "runs/mvbench")
    owlvid.eval.run_images("pope", "/data/POPE", owlvid.load("mPLUG/mPLUG-Owl3-7B-241101"), "runs/pope")
    owlvid.eval.score_response(benchmark="mvbench", protocol="official", response="B.", options=[...], answer="B")
    owlvid.eval.score_response(benchmark="vqav2", protocol="lmms_eval", response="Two", answers=[...10 answers])
    owlvid.eval.aggregate_metrics(benchmark="pope", protocol="official", responses=[...], answers=["yes", ...])
"""

from .compare import compare_table
from .datasets import Question, load_questions
from .image_runner import run_images
from .image_scoring import IMAGE_BENCHMARKS, aggregate_metrics
from .protocols import BENCHMARKS, PROTOCOLS, Protocol, get_protocol
from .results import format_table
from .runner import run
from .scoring import Score, score_response

__all__ = ["BENCHMARKS", "IMAGE_BENCHMARKS", "PROTOCOLS", "Protocol", "Question", "Score", "aggregate_metrics",
           "compare_table", "format_table", "get_protocol", "load_questions", "run", "run_images",
           "score_response"]
